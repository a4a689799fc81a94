"""data/fetch_weights.py: the table, checksums, placement and the offline usage, with local files only."""
import hashlib

import pytest
import torch

import data.fetch_weights as fetch_weights
from data.fetch_weights import CLIP_FOLDER, TORCH_CHECKPOINTS, WEIGHTS, Weight, fetch
from tgn.errors import UserError


def test_table_matches_the_urls_torchvision_and_clip_use():
    import warnings

    from torchvision import models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import clip
    torchvision_urls = {"resnet50": models.ResNet50_Weights.IMAGENET1K_V1.url,
                        "resnet18": models.ResNet18_Weights.IMAGENET1K_V1.url,
                        "inception-v3": models.Inception_V3_Weights.IMAGENET1K_V1.url,
                        "alexnet": models.AlexNet_Weights.IMAGENET1K_V1.url}
    by_name = {weight.name: weight for weight in WEIGHTS}
    for name, url in torchvision_urls.items():
        assert by_name[name].url == url and by_name[name].folder == TORCH_CHECKPOINTS
        assert by_name[name].file_name.rsplit("-", 1)[1] == f"{by_name[name].sha256}.pth"  # torch.hub's check
    clip_weight = by_name["clip-vit-b32"]
    assert clip_weight.url == clip.clip._MODELS["ViT-B/32"]
    assert clip_weight.url.split("/")[-2] == clip_weight.sha256 and len(clip_weight.sha256) == 64


def published(tmp_path, name, content, in_hash_folder=False):
    """A local 'server' file; torchvision-style (hash prefix in the name) or CLIP-style (digest folder)."""
    digest = hashlib.sha256(content).hexdigest()
    folder = tmp_path / "server" / (digest if in_hash_folder else "models")
    folder.mkdir(parents=True, exist_ok=True)
    file_name = name if in_hash_folder else f"{name}-{digest[:8]}.pth"
    (folder / file_name).write_bytes(content)
    return (folder / file_name).as_uri(), digest


@pytest.fixture
def local_table(tmp_path, monkeypatch):
    state = {"weight": torch.arange(4.0)}
    torch.save(state, tmp_path / "state.pth")
    tv_url, tv_digest = published(tmp_path, "tinynet", (tmp_path / "state.pth").read_bytes())
    clip_url, clip_digest = published(tmp_path, "ViT-T.pt", b"clip weights", in_hash_folder=True)
    table = (Weight("resnet50", tv_url, TORCH_CHECKPOINTS, tv_digest[:8], "test"),
             Weight("clip-vit-b32", clip_url, "clip", clip_digest, "test"))
    monkeypatch.setattr(fetch_weights, "WEIGHTS", table)
    return table


def test_the_offline_setup_uses_the_shell_of_the_machine_it_ran_on():
    assert fetch_weights.set_variable("TORCH_HOME", "/w/torch", windows=False) == "export TORCH_HOME=/w/torch"
    assert fetch_weights.set_variable("TORCH_HOME", "/my w/torch", windows=False) == "export TORCH_HOME='/my w/torch'"
    assert fetch_weights.set_variable("TORCH_HOME", r"my w\torch", windows=True) == r'set "TORCH_HOME=my w\torch"'


def test_fetch_places_verifies_skips_and_prints_the_offline_setup(local_table, tmp_path, monkeypatch, capsys):
    out = tmp_path / "weights"
    fetch_weights.main(["--out", str(out)])
    printed = capsys.readouterr().out
    torchvision_file = out / "torch" / "hub" / "checkpoints" / local_table[0].file_name
    clip_file = out / "clip" / "ViT-T.pt"
    assert torchvision_file.is_file() and clip_file.read_bytes() == b"clip weights"
    assert f"\n    {fetch_weights.set_variable('TORCH_HOME', out.resolve() / 'torch')}\n" in printed  # a line to paste
    assert f"--pretrained {torchvision_file.resolve()}" in printed and f"--clip {clip_file.resolve()}" in printed
    assert not list(out.rglob("*.tmp"))

    def no_download(url, target):
        raise AssertionError("a valid file was downloaded again")

    monkeypatch.setattr(fetch_weights, "download", no_download)
    fetch_weights.main(["--out", str(out)])
    assert capsys.readouterr().out.count("present") == 2

    # torch.hub, as torchvision calls it, finds the file under TORCH_HOME without a download.
    monkeypatch.setenv("TORCH_HOME", str(out / "torch"))
    loaded = torch.hub.load_state_dict_from_url(f"https://download.pytorch.org/models/{local_table[0].file_name}",
                                                check_hash=True)
    assert torch.equal(loaded["weight"], torch.arange(4.0))


def test_a_corrupt_file_is_replaced_and_a_wrong_checksum_keeps_nothing(local_table, tmp_path, monkeypatch, capsys):
    out = tmp_path / "weights"
    target = out / "clip" / "ViT-T.pt"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    assert fetch(local_table[1], out) == (target, "downloaded") and target.read_bytes() == b"clip weights"

    wrong = Weight("clip-vit-b32", local_table[1].url, "clip", "0" * 64, "test")
    monkeypatch.setattr(fetch_weights, "WEIGHTS", (wrong,))
    target.unlink()
    with pytest.raises(SystemExit) as exit_info:
        fetch_weights.main(["--out", str(out)])
    assert exit_info.value.code == 2 and "does not match the expected" in capsys.readouterr().err
    assert not any(target.parent.iterdir())  # neither the file nor a temporary one


def test_an_unreachable_url_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    missing = Weight("alexnet", (tmp_path / "nowhere-12345678.pth").as_uri(), TORCH_CHECKPOINTS, "12345678", "test")
    monkeypatch.setattr(fetch_weights, "WEIGHTS", (missing,))
    with pytest.raises(SystemExit) as exit_info:
        fetch_weights.main(["--out", str(tmp_path / "weights")])
    assert exit_info.value.code == 2 and "cannot download" in capsys.readouterr().err


def test_files_are_readable_as_open_makes_them_and_what_a_killed_run_left_goes(local_table, tmp_path, monkeypatch,
                                                                             capsys):
    """mkstemp's files are owner-only: a weights folder shared with a group, or copied with
    its modes to another account, could not be read. A killed run's partial file is removed
    by the next; a folder in the file's place, a connection cut short and a stalled server
    are one line; the offline lines name only what was fetched."""
    import os
    import stat
    import urllib.request

    from tgn.io import FILE_MODE

    out = tmp_path / "weights"
    leftover = out / "clip" / f".{local_table[1].file_name}.abc123.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    timeouts = []
    urlopen = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: timeouts.append(timeout) or
                        urlopen(url, timeout=timeout))
    fetch_weights.main(["--out", str(out), "--only", "clip-vit-b32"])
    target = out / "clip" / local_table[1].file_name
    assert stat.S_IMODE(os.stat(target).st_mode) == FILE_MODE and not leftover.exists()
    assert timeouts == [fetch_weights.STALL_TIMEOUT_S]
    printed = capsys.readouterr().out
    assert "TORCH_HOME" not in printed and "--pretrained" not in printed  # nothing of torchvision's fetched
    blocked = out / "torch" / "hub" / "checkpoints" / local_table[0].file_name
    blocked.mkdir(parents=True)
    with pytest.raises(SystemExit):
        fetch_weights.main(["--out", str(out), "--only", "resnet50"])
    assert f"{blocked} is a folder, not the weight file; move it away" in capsys.readouterr().err
    blocked.rmdir()
    monkeypatch.setattr(fetch_weights, "download", lambda url, tmp: (5, 10))
    with pytest.raises(SystemExit):
        fetch_weights.main(["--out", str(out), "--only", "resnet50"])
    assert "the connection ended after 5 of 10 bytes; run again" in capsys.readouterr().err
    assert not list(blocked.parent.iterdir())


def test_a_chunked_reply_cut_short_is_one_line(local_table, tmp_path, monkeypatch, capsys):
    """A reply without Content-Length that ends early raises http.client.IncompleteRead,
    which is no OSError."""
    import http.client

    def cut_short(url, tmp):
        raise http.client.IncompleteRead(b"0123456789abcdef")

    monkeypatch.setattr(fetch_weights, "download", cut_short)
    with pytest.raises(SystemExit) as exit_info:
        fetch_weights.main(["--out", str(tmp_path / "weights"), "--only", "resnet50"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: cannot download ") and len(err.splitlines()) == 1


def test_a_second_run_into_the_same_folder_waits_instead_of_removing_the_firsts_file(local_table, tmp_path,
                                                                                   monkeypatch, capsys):
    """Each run removes the temp files a killed run left: a second run at once took the
    first's file being written for one, and the first stopped in a traceback."""
    import multiprocessing
    import time

    real_download = fetch_weights.download

    def slow_download(url, tmp):
        time.sleep(1.5)  # the second run starts meanwhile
        return real_download(url, tmp)

    monkeypatch.setattr(fetch_weights, "download", slow_download)
    out = tmp_path / "weights"
    first = multiprocessing.get_context("fork").Process(target=fetch_weights.main,
                                                        args=(["--out", str(out), "--only", "clip-vit-b32"],))
    first.start()
    deadline = time.time() + 30
    while not list((out / "clip").glob(".*.tmp")) and time.time() < deadline:  # the first is downloading
        time.sleep(0.05)
    fetch_weights.main(["--out", str(out), "--only", "clip-vit-b32"])
    first.join(30)
    assert first.exitcode == 0
    assert "present" in capsys.readouterr().out  # the first's file, found once it was there


def test_the_clip_weight_is_placed_where_clip_root_reads_it():
    """clip.load(download_root=...) looks for OUT/clip/ViT-B-32.pt."""
    clip_weight = {weight.name: weight for weight in WEIGHTS}["clip-vit-b32"]
    assert CLIP_FOLDER == "clip" and clip_weight.folder == "clip" and clip_weight.file_name == "ViT-B-32.pt"


def test_a_full_digest_is_checked_past_its_first_eight_digits(tmp_path):
    """CLIP's weight has a full SHA-256: all of it is compared, for a download and for a
    file already there (torchvision's carry 8 digits in their names)."""
    content = b"clip weights"
    folder = tmp_path / "server" / "h"
    folder.mkdir(parents=True)
    (folder / "ViT-T.pt").write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    wrong = digest[:8] + ("0" if digest[8] != "0" else "1") + digest[9:]
    weight = Weight("clip-vit-b32", (folder / "ViT-T.pt").as_uri(), "clip", wrong, "test")
    out = tmp_path / "weights"
    with pytest.raises(UserError, match="does not match the expected"):  # downloaded
        fetch(weight, out)
    (out / "clip").mkdir(parents=True, exist_ok=True)
    (out / "clip" / "ViT-T.pt").write_bytes(content)
    with pytest.raises(UserError, match="does not match the expected"):  # not taken as present
        fetch(weight, out)
