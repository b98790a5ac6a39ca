"""common.py, what the three scripts share.

The append-only JSONL files every script resumes from (generation progress, judge caches,
train.py's log): a kill may cut the last line at any byte, even inside a multi-byte character.
Reading keeps every complete record and skips the torn one; appending first closes the torn line.
Folders are built beside their final place and swapped in; a failure or a dead process leaves
nothing behind."""
import json
import os
import subprocess
import sys

import pytest

import common

RECORDS = [{"id": 0, "prediction": "根据《中华人民共和国刑法》第二百六十四条，"
                                   "盗窃公私财物，数额较大的，处三年以下有期徒刑。"},
           {"id": 1, "prediction": "法条:刑法第264条"},
           {"id": 2, "prediction": "答案：B。理由：……"}]


def write_cut(path, cut):
    data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in RECORDS)
    path.write_bytes(data[:cut])
    return data


def test_a_file_cut_at_any_byte_reads_as_its_complete_records(tmp_path):
    path = tmp_path / "p.jsonl"
    data = write_cut(path, None)
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    for cut in range(len(data) + 1):
        write_cut(path, cut)
        complete = sum(end <= cut for end in ends)
        # a cut right before the newline leaves a whole object: it reads as complete too
        whole = complete + (cut + 1 in ends)
        assert common.read_jsonl(str(path)) == RECORDS[:whole], cut
        assert common.read_jsonl_map(str(path), "id", "prediction") == {r["id"]: r["prediction"]
                                                                        for r in RECORDS[:whole]}


def test_appending_after_a_cut_inside_a_character_starts_a_new_line(tmp_path):
    path = tmp_path / "p.jsonl"
    data = write_cut(path, None)
    first_end = data.index(b"\n") + 1
    inside = first_end + len(b'{"id": 1, "prediction": "') + 4  # two bytes into "法" (3 bytes in UTF-8)
    write_cut(path, inside)
    try:
        path.read_bytes().decode("utf-8")
        raise AssertionError("the cut should be inside a character")
    except UnicodeDecodeError:
        pass
    with common.open_jsonl_append(str(path)) as f:
        f.write(json.dumps(RECORDS[2], ensure_ascii=False) + "\n")
    assert common.read_jsonl(str(path)) == [RECORDS[0], RECORDS[2]]


def test_a_missing_file_and_rows_without_the_fields_read_as_nothing(tmp_path):
    assert common.read_jsonl(str(tmp_path / "none.jsonl")) == [] and common.read_jsonl(None) == []
    (tmp_path / "odd.jsonl").write_text('[1, 2]\n{"id": 3}\n"text"\n{"id": 4, "prediction": "x"}\n')
    assert common.read_jsonl_map(str(tmp_path / "odd.jsonl"), "id", "prediction") == {4: "x"}


def test_a_staged_folder_replaces_the_old_one_only_when_complete(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with common.staged_folder(str(final)) as tmp:
            (tmp_path / "x").write_text(tmp)
            open(os.path.join(tmp, "half.bin"), "wb").write(b"0" * 1000)
            raise RuntimeError("the conversion crashed")
    assert sorted(os.listdir(tmp_path)) == ["final", "x"]
    assert not os.path.exists((tmp_path / "x").read_text())  # the staging folder is gone
    assert os.listdir(final) == ["old.txt"]
    with common.staged_folder(str(final)) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert os.listdir(final) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["final", "x"]


def test_a_staging_folder_left_by_a_dead_process_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead_pid, live.pid):
            (tmp_path / f"final.tmp-{pid}").mkdir()
        with common.staged_folder(str(tmp_path / "final")):
            pass
        assert sorted(os.listdir(tmp_path)) == ["final", f"final.tmp-{live.pid}"]
    finally:
        live.kill()


def test_log_speaks_on_rank_0_of_several_and_whenever_one_process_runs(monkeypatch, capsys):
    for rank, world, heard in (("0", "2", True), ("1", "2", False), ("1", None, True)):  # a stray RANK alone
        monkeypatch.setenv("RANK", rank)
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        common.log("hello")
        assert ("hello" in capsys.readouterr().err) == heard, (rank, world)


def render_chinese(tmp_path):
    """Draw a chart with Chinese labels; the glyph warnings matplotlib gave."""
    import warnings

    import common
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plt = common.pyplot("法条背诵")
        fig, ax = plt.subplots()
        ax.set_title("1-1 法条背诵 / 农学")
        fig.savefig(tmp_path / "c.png")
        plt.close(fig)
    return plt.rcParams["font.family"], [w for w in caught if "missing from font" in str(w.message)]


def test_charts_render_chinese_with_an_installed_font(tmp_path, capsys):
    """Chart labels such as 法条背诵 or 农学 need a Chinese font behind DejaVu Sans (CI installs
    fonts-wqy-microhei; on a machine without one the next test's path applies)."""
    import common
    common._CJK_WARNED.clear()
    families, missing = render_chinese(tmp_path)
    if not any(name in families for name in common.CJK_FONTS):
        pytest.fail("no Chinese font installed: apt-get install fonts-wqy-microhei (or fonts-noto-cjk)")
    assert families[0] == "DejaVu Sans" and missing == [] and capsys.readouterr().err == ""


def test_without_a_chinese_font_charts_say_once_how_to_get_one(tmp_path, capsys, monkeypatch):
    import common
    common._CJK_WARNED.clear()
    monkeypatch.setattr(common, "CJK_FONTS", ["No Such Font"])
    families, missing = render_chinese(tmp_path)
    families, missing_again = render_chinese(tmp_path)
    assert families == ["DejaVu Sans"] and missing == missing_again == []  # not one warning per character
    assert capsys.readouterr().err.count("apt-get install fonts-wqy-microhei") == 1
