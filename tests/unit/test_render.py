import io

from controller.render import PullRenderer, ago, human_duration, human_size, progress_bar


def test_human_size_like_docker() -> None:
    assert human_size(0) == "0B"
    assert human_size(999) == "999B"
    assert human_size(4_261_234) == "4.26MB"
    assert human_size(1_000_000_000) == "1GB"
    assert human_size(130_000) == "130kB"


def test_durations() -> None:
    assert human_duration(0.5) == "Less than a second"
    assert human_duration(30) == "30 seconds"
    assert human_duration(90) == "About a minute"
    assert human_duration(3 * 3600) == "3 hours"
    assert human_duration(10 * 86400) == "10 days"
    assert human_duration(70 * 86400) == "2 months"
    assert ago(0) == "N/A"
    assert ago(100, now=160) == "About a minute ago"


def test_progress_bar() -> None:
    assert progress_bar(0, 0) == ""
    bar = progress_bar(50, 100, width=10)
    assert bar.startswith("[====>     ]") and bar.endswith("50B/100B")


def test_plain_output_prints_status_changes_once() -> None:
    out = io.StringIO()
    r = PullRenderer(out, tty=False)
    r.event("", "1: Pulling from busybox")
    r.event("abc", "Pulling fs layer")
    r.event("abc", "Downloading", 10, 100)
    r.event("abc", "Downloading", 50, 100)
    r.event("abc", "Pull complete")
    r.event("", "Digest: sha256:x")
    assert out.getvalue().splitlines() == [
        "1: Pulling from busybox", "abc: Pulling fs layer", "abc: Downloading", "abc: Pull complete",
        "Digest: sha256:x"]


def test_tty_output_redraws_in_place() -> None:
    out = io.StringIO()
    r = PullRenderer(out, tty=True)
    r.event("a", "Pulling fs layer")
    r.event("b", "Pulling fs layer")
    r.event("a", "Downloading", 5, 10)
    text = out.getvalue()
    assert "\x1b[2A" in text and "a: Downloading [" in text
    r.event("", "Status: done")
    assert out.getvalue().endswith("Status: done\n")
