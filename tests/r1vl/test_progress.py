"""r1vl.progress: tqdm's redrawn bar on a terminal, one plain line per step in a file."""
import io

from r1vl.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_file_gets_one_line_per_step_and_no_carriage_returns():
    out = io.StringIO()
    bar = progress_bar(3, "StepGRPO", True, file=out, initial=0, leave=True)
    assert isinstance(bar, LineProgress)
    for step in range(1, 4):
        bar.set_postfix(reward=f"{0.1 * step:.3f}", refresh=False)
        bar.update(1)
        if step == 2:
            bar.write("grpo step 2 | reward 0.2")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith("StepGRPO 1/3") and lines[0].endswith("reward=0.100")
    assert lines[2] == "grpo step 2 | reward 0.2" and lines[3].startswith("StepGRPO 3/3")


def test_a_terminal_gets_tqdms_redrawn_bar():
    out = Terminal()
    bar = progress_bar(3, "StepGRPO", True, file=out)
    assert not isinstance(bar, LineProgress)
    bar.update(1)
    bar.close()
    assert "\r" in out.getvalue()  # tqdm redraws in place


def test_disabled_and_transient_bars_print_nothing_in_a_file():
    for enabled, leave in ((False, True), (True, False)):
        out = io.StringIO()
        bar = progress_bar(5, "rollout", enabled, file=out, leave=leave)
        bar.update(1)
        bar.set_postfix(live=3, refresh=False)
        bar.close()
        assert out.getvalue() == ""
