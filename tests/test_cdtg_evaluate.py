"""CDTG/evaluate.py: FID, LPIPS diversity, CLIP and M_T consistency, reports, sample sheet."""
import codecs
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import PALETTE, exit_message, tiny_clip
from conftest import TAIL_IDS
import CDTG.evaluate as evaluate_script
import CDTG.evaluation
from CDTG.checkpoint import save_cdtg_checkpoint
from CDTG.clip_loss import ClipConsistencyLoss
from CDTG.eval_report import evaluation_markdown
from CDTG.evaluation import Evaluator, SetScores, class_row, overall_row, pooled, recorded_inputs
from CDTG.fidelity import (FeatureExtractor, fid, frechet_distance, inception_pool_network, kid, load_inception,
                           load_lpips, mean_pairwise_lpips, sample_pairs)
from CDTG.generated_folder import image_name, write_generated_annotation
from CDTG.tail_data import load_tail_classes
from tgn.io import atomic_write_json


def test_frechet_distance_is_zero_on_itself_and_grows_with_a_shift():
    features = np.random.default_rng(0).normal(size=(400, 6))
    assert fid(features, features) == pytest.approx(0, abs=1e-6)
    shifts = [fid(features, features + shift) for shift in (0.1, 0.5, 1.0)]
    assert shifts == pytest.approx([6 * 0.01, 6 * 0.25, 6.0], rel=1e-6)  # same covariance: ||mu1 - mu2||^2
    # Gaussians with diagonal covariances: sum (a + b - 2 sqrt(ab)) plus the mean term.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 3.0 + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(expected)


def test_frechet_distance_of_singular_and_degenerate_covariances():
    few = np.random.default_rng(1).normal(size=(5, 16))  # fewer images than dimensions: singular
    assert np.isfinite(fid(few, few + 1.0)) and fid(few, few) == pytest.approx(0, abs=1e-3)
    assert np.isnan(fid(few[:1], few))
    with pytest.warns(UserWarning, match="imaginary"):  # no real square root: n/a for that set, not a stop
        assert np.isnan(frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0])))


def test_frechet_distance_equals_the_reference_square_root_of_the_product():
    """The reference FID code's scipy sqrtm(sigma1 sigma2), with full-rank covariances and
    with fewer images than dimensions (then checked against the product's eigenvalues)."""
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(2)
    for count_a, count_b, dimension in ((200, 150, 12), (10, 14, 24)):
        a = rng.normal(size=(count_a, dimension)) @ rng.normal(size=(dimension, dimension))
        b = rng.normal(size=(count_b, dimension)) @ rng.normal(size=(dimension, dimension)) + 0.3
        sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        if count_a > dimension:
            trace_sqrt = np.trace(sqrtm(sigma_a @ sigma_b).real)
        else:
            trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(sigma_a @ sigma_b).real, 0, None)).sum()
        mean_term = np.sum((a.mean(0) - b.mean(0)) ** 2)
        expected = mean_term + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt
        assert fid(a, b) == pytest.approx(expected, rel=1e-6)


def test_kid_is_the_unbiased_polynomial_mmd_and_unlike_fid_does_not_grow_at_small_counts():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.3, 1.2, size=(4, 5))
    kernel = lambda a, b: (a @ b.T / 5 + 1) ** 3  # noqa: E731
    off_diagonal = lambda k: (k.sum() - np.trace(k)) / (len(k) * (len(k) - 1))  # noqa: E731
    expected = off_diagonal(kernel(x, x)) + off_diagonal(kernel(y, y)) - 2 * kernel(x, y).mean()
    assert kid(x, y) == pytest.approx(expected, rel=1e-12)
    for block in (1, 2, 3):  # blocks of rows (within a set, from the diagonal on): the same sums
        assert kid(x, y, block=block) == pytest.approx(expected, rel=1e-12)
    assert kid(x, y, device="cpu") == kid(x, y)
    assert np.isnan(kid(x[:1], y))
    # Draws of 30 from one distribution: their FID, from the count alone, is near half that of
    # a real shift; their KID averages to 0 (unbiased), under 5% of the shift's.
    same = [(rng.normal(size=(30, 8)), rng.normal(size=(30, 8))) for _ in range(40)]
    mean_of = lambda metric, shift: np.mean([metric(a, b + shift) for a, b in same])  # noqa: E731
    assert mean_of(fid, 0) > 0.3 * mean_of(fid, 0.5)
    assert abs(mean_of(kid, 0)) < 0.05 * mean_of(kid, 0.5)


def test_the_overall_fid_pools_the_classes_in_equal_proportions():
    rng = np.random.default_rng(0)

    def sets(counts):  # class 0 near 0, class 1 near 10: the same distributions in both sets
        return {cid: SetScores(n, features=rng.normal(10 * cid, 1, (n, 4))) for cid, n in counts.items()}

    real, generated = sets({0: 200, 1: 40}), sets({0: 200, 1: 200})
    row = overall_row(real, generated)
    assert row["fid_images"] == 240
    unmatched = fid(pooled(real, [0, 1]).features, pooled(generated, [0, 1]).features)
    assert row["fid"] < 1 < 20 < unmatched  # only the class proportions differed
    assert overall_row(real, generated)["fid"] == row["fid"]  # seeded subsets


def test_the_overall_diversity_of_both_sets_is_over_the_same_classes():
    """A class of one generated image has no generated LPIPS: its real LPIPS must not count
    either, or the overall row compares the diversity of other classes."""
    real = {3: SetScores(5, lpips=0.2), 5: SetScores(5, lpips=0.6)}
    generated = {3: SetScores(5, lpips=0.2), 5: SetScores(1)}  # one image: no pair
    row = overall_row(real, generated)
    assert row["lpips_generated"] == pytest.approx(0.2) and row["lpips_real"] == pytest.approx(0.2)


def test_the_inputs_generation_recorded_come_first(tmp_path):
    # generation.py with --data / --teacher (e.g. from the official 200000.pt, which records neither)
    atomic_write_json(tmp_path / "generation.json", {"ckpt": str(tmp_path / "200000.pt"), "data": "tail",
                                                     "teacher": "M_T.pth"})
    assert recorded_inputs(tmp_path) == {"data": "tail", "teacher": "M_T.pth"}
    atomic_write_json(tmp_path / "generation.json", {"ckpt": str(tmp_path / "gone.pt")})  # an earlier version
    assert recorded_inputs(tmp_path) == {"gone": str(tmp_path / "gone.pt")}  # named as gone, not as recording nothing


def tiny_extractor():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, stride=2)
    nn.init.normal_(conv.weight)  # large enough that a colour shift moves the features clearly
    return FeatureExtractor(nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 32, "tiny random test net")


def test_inception_file_loads_as_2048_d_extractor_named_by_its_hash(tmp_path):
    import torchvision

    torch.manual_seed(0)
    released_layout = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(released_layout.state_dict(), tmp_path / "inception.pth")  # fc included, as in the release
    extractor = load_inception(str(tmp_path / "inception.pth"))
    assert "sha256" in extractor.name and len(extractor.name.split("sha256 ")[1]) == 64
    assert extractor(torch.rand(1, 3, 32, 32) * 2 - 1).shape == (1, 2048)
    assert isinstance(inception_pool_network().fc, nn.Identity)


def test_lpips_builds_offline_with_the_packaged_linear_layers(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("LPIPS tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = load_lpips("alex", random_trunk=True)
    import lpips

    packaged = torch.load(f"{lpips.__path__[0]}/weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    assert torch.equal(model.lin0.model[-1].weight, packaged["lin0.model.1.weight"])
    assert load_lpips("none") is None


def test_lpips_diversity_of_identical_images_is_zero():
    model = load_lpips("alex", random_trunk=True)
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    assert mean_pairwise_lpips(model, image.repeat(4, 1, 1, 1), 10, seed=0) == pytest.approx(0, abs=1e-7)
    different = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert mean_pairwise_lpips(model, different, 10, seed=0) > 0
    assert np.isnan(mean_pairwise_lpips(model, image, 10, seed=0))


def test_lpips_pairs_are_all_pairs_or_random_distinct_ones():
    assert sample_pairs(4, 10, 0).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    pairs = sample_pairs(100, 50, 0)
    assert pairs.shape == (50, 2) and (pairs[:, 0] != pairs[:, 1]).all() and pairs.max() < 100
    assert np.array_equal(pairs, sample_pairs(100, 50, 0))


def test_clip_consistency_on_a_tiny_random_clip():
    prompts = ["A photo of a airport", "A photo of a dam", "A photo of a golf field"]
    clip = ClipConsistencyLoss(tiny_clip(), prompts)
    evaluator = Evaluator(inception=None, lpips=None, clip=clip, teacher=None, device=torch.device("cpu"),
                          batch_size=3)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    scores = evaluator.score(images, label=1, seed=0)
    predicted = clip.logits(images.float() / 127.5 - 1).argmax(1)
    assert scores.clip_correct == int((predicted == 1).sum()) and scores.count == 5
    assert scores.features is None and scores.teacher_correct is None and np.isnan(scores.lpips)


def write_generated(folder, tail, *, r, ckpt, shift=0.0, count=5):
    """A folder in CDTG/generation.py's format: noisy class colours, brightened by `shift`."""
    rng = np.random.default_rng(int(r * 100))
    for cid in tail.ids:
        (folder / str(cid)).mkdir(parents=True)
        for index in range(count):
            colour = np.array(PALETTE[cid % len(PALETTE)], dtype=np.float64) + shift
            pixels = np.clip(colour + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / str(cid) / image_name(index), quality=95)
    write_generated_annotation(folder, tail.ids)
    atomic_write_json(folder / "generation.json", {"ckpt": str(ckpt), "r": r, "truncation": 1.0, "seed": 0})
    return folder


def copy_real_as_generated(folder, tail, ckpt):
    """The real tail images under generated names: FID to the real ones is 0."""
    counters = {}
    for path, label in tail.samples():
        cid = tail.ids[label]
        index = counters.setdefault(cid, 0)
        counters[cid] += 1
        (folder / str(cid)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / str(cid) / image_name(index))
    write_generated_annotation(folder, tail.ids)
    atomic_write_json(folder / "generation.json", {"ckpt": str(ckpt), "r": 0.05})
    return folder


@pytest.fixture
def evaluation_inputs(cdtg_inputs, monkeypatch):
    """Two generated folders (the real images copied, and shifted colours) from a checkpoint
    that records the tail data and M_T; the FID and LPIPS models swapped for tiny random ones."""
    root = cdtg_inputs
    save_cdtg_checkpoint(root / "gan.pt", {"g_ema": {}, "data": str(root / "cdtg_data"),
                                           "teacher": str(root / "M_T.pth")})
    tail = load_tail_classes(root / "cdtg_data")
    copy_real_as_generated(root / "gen_copy", tail, root / "gan.pt")
    write_generated(root / "gen_shifted", tail, r=0.8, ckpt=root / "gan.pt", shift=-90)
    monkeypatch.setattr(CDTG.evaluation, "load_inception", lambda spec: None if spec == "none" else tiny_extractor())
    monkeypatch.setattr(CDTG.evaluation, "load_lpips", lambda spec: load_lpips(spec, random_trunk=True))
    return root


def test_evaluate_writes_the_comparison_per_class_rows_and_the_sample_sheet(evaluation_inputs):
    root = evaluation_inputs
    out = root / "evaluation"
    stale = out / ".evaluation.json.k1ll3d.tmp"  # what an evaluation killed mid-write leaves
    out.mkdir()
    stale.write_text("half a report")
    evaluation = evaluate_script.main([str(root / "gen_copy"), str(root / "gen_shifted"), "--clip",
                                       str(root / "clip.pt"), "--out", str(out), "--device", "cpu",
                                       "--workers", "0", "--pairs", "5", "--max-per-class", "6"])
    assert not stale.exists()
    assert [folder["label"] for folder in evaluation["folders"]] == ["r=0.05", "r=0.8"]
    assert evaluation["teacher"] == str(root / "M_T.pth")  # recorded by the generation checkpoint
    assert evaluation["feature_extractor"] == "tiny random test net" and evaluation["settings"]["size"] == 32
    copy, shifted = evaluation["folders"]
    assert [row["id"] for row in copy["classes"]] == TAIL_IDS
    assert [row["real_images"] for row in copy["classes"]] == [6, 4, 4]  # class 2 capped at --max-per-class
    assert [row["generated_images"] for row in shifted["classes"]] == [5, 5, 5]
    assert copy["overall"]["fid"] == pytest.approx(0, abs=1e-3)
    assert shifted["overall"]["fid"] > 10 and all(row["fid"] > copy_row["fid"] + 10 for row, copy_row
                                                 in zip(shifted["classes"], copy["classes"]))
    assert copy["overall"]["kid"] <= 0  # copies: the unbiased estimate of no difference is not above 0
    assert all(row["kid"] > copy_row["kid"] for row, copy_row in zip(shifted["classes"], copy["classes"]))
    # The same images: the same diversity (--pairs 5 samples pairs, the same for both) and accuracies.
    for row in copy["classes"]:
        assert row["lpips_generated"] == pytest.approx(row["lpips_real"], rel=1e-4) and row["lpips_real"] > 0
        assert row["clip_accuracy_generated"] == row["clip_accuracy_real"]
        assert row["teacher_accuracy_generated"] == row["teacher_accuracy_real"]
    assert json.loads((out / "evaluation.json").read_text()) == evaluation

    assert (out / "evaluation.csv").read_bytes().startswith(codecs.BOM_UTF8)  # for Excel
    rows = list(csv.DictReader((out / "evaluation.csv").open(encoding="utf-8-sig")))
    assert [(row["folder"], row["id"]) for row in rows] == [
        (label, cid) for label in ("r=0.05", "r=0.8") for cid in ["2", "3", "4", "all"]]
    from CDTG.eval_report import CSV_COLUMNS

    by_row = [row for folder in evaluation["folders"] for row in [*folder["classes"], folder["overall"]]]
    for cells, row in zip(rows, by_row):  # every number in its own column, as evaluation.json holds it (KID raw)
        for key in CSV_COLUMNS[4:]:
            assert cells[key] == "n/a" if row[key] is None else float(cells[key]) == pytest.approx(row[key], abs=1e-9)
    markdown = (out / "evaluation.md").read_text()
    assert "| r=0.8 | 14 | 15 |" in markdown and "| 4 golf field |" in markdown
    assert "torchvision's Inception-v3" in markdown and "tiny random test net" in markdown
    overall = next(line for line in markdown.splitlines() if line.startswith("| r=0.8 | 14 | 15 |"))
    assert "| KID x1000 |" in markdown and overall.split(" | ")[4] == f"{1000 * shifted['overall']['kid']:.2f}"
    assert overall.split(" | ")[3].endswith(" *") and "FID marked * comes from fewer than 100" in markdown
    large = json.loads(json.dumps(evaluation))  # the same report, as if from 200 images per set
    for folder in large["folders"]:
        for row in [folder["overall"], *folder["classes"]]:
            row.update(real_images=200, generated_images=200, fid_images=200)
    assert " *" not in evaluation_markdown(large) and "FID marked" not in evaluation_markdown(large)
    with Image.open(out / "samples.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 3 * 6 * 64 and sheet.height > 3 * 64


def test_every_number_of_the_evaluation_table_rounds_halves_up_and_never_shows_minus_zero():
    """FID, KID and LPIPS round as the accuracies beside them do (half up, as a table made
    from evaluation.csv would), not half to even as Python's format does (2.125 read 2.12)."""
    row = {"fid": 2.125, "kid": 0.0030625, "lpips_generated": 0.03125, "lpips_real": -0.00001,
           "clip_accuracy_generated": 29 / 32, "clip_accuracy_real": None, "teacher_accuracy_generated": 0.5,
           "teacher_accuracy_real": 1.0, "real_images": 200, "generated_images": 200, "fid_images": 200}
    evaluation = {"feature_extractor": "x", "lpips": "x", "clip": "x", "teacher": "x", "notes": [],
                  "folders": [{"label": "gen", "path": "gen", "overall": row, "classes": []}]}
    line = next(line for line in evaluation_markdown(evaluation).splitlines() if line.startswith("| gen |"))
    assert line == "| gen | 200 | 200 | 2.13 | 3.06 | 0.0313 | 0.0000 | 90.63 | n/a | 50.00 | 100.00 |"


def test_evaluate_holds_its_folder_while_it_writes_and_runs_in_one_process(evaluation_inputs, monkeypatch, capsys):
    """A second evaluation into the same new folder is refused while the first writes; under
    torchrun every process scored every folder and wrote the same files."""
    import CDTG.evaluation as evaluation_module
    from test_reliability import hold_folder_fails

    root = evaluation_inputs
    argv = [str(root / "gen_copy"), "--clip", "none", "--out", str(root / "fresh"), "--device", "cpu",
            "--workers", "0", "--pairs", "4", "--max-per-class", "4"]
    held = []
    real_write = evaluation_module.write_evaluation
    monkeypatch.setattr(evaluation_module, "write_evaluation", lambda evaluation, folder: (
        held.append(hold_folder_fails(folder)), real_write(evaluation, folder)))
    evaluate_script.main(argv)
    assert held == [True]
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        evaluate_script.main([*argv, "--out", str(root / "torchrun")])
    assert "CDTG/evaluate.py runs in one process: start it with python, not torchrun" in capsys.readouterr().err
    assert not (root / "torchrun").exists()


def test_evaluate_without_teacher_notes_it_and_refuses_a_foreign_folder(evaluation_inputs, capsys):
    root = evaluation_inputs
    common = ["--data", str(root / "cdtg_data"), "--clip", "none", "--lpips", "none", "--inception", "none",
              "--device", "cpu", "--workers", "0", "--out", str(root / "evaluation")]
    (root / "gen_shifted" / "generation.json").unlink()  # nothing recorded: no teacher
    with pytest.warns(UserWarning, match="M_T accuracy skipped: no --teacher"):
        evaluation = evaluate_script.main([str(root / "gen_shifted"), *common])
    assert evaluation["folders"][0]["label"] == "gen_shifted" and evaluation["teacher"] is None
    assert any("M_T accuracy skipped" in note for note in evaluation["notes"])
    assert evaluation["folders"][0]["overall"]["fid"] is None
    with pytest.raises(SystemExit):  # a report is never replaced without --overwrite
        evaluate_script.main([str(root / "gen_shifted"), *common])
    assert "already holds results (evaluation.json)" in capsys.readouterr().err
    (root / "foreign").mkdir()
    (root / "foreign" / "anno.txt").write_text("0/a.jpg 0\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_script.main([str(root / "foreign"), *common, "--overwrite"])
    assert exit_info.value.code == 2 and "class id 0 is not a tail class" in capsys.readouterr().err
    run = root / "cdtg_run"  # a training run's folder: its options.json is what --resume checks
    run.mkdir()
    (run / "options.json").write_text('{"iter": 6, "size": 32, "clip": "none"}')
    with pytest.raises(SystemExit):
        evaluate_script.main([str(root / "gen_shifted"), *common[:-1], str(run), "--overwrite"])
    assert "is a run folder of CDTG/train.py (its options.json); choose another --out" in capsys.readouterr().err
    assert (run / "options.json").read_text() == '{"iter": 6, "size": 32, "clip": "none"}'


def test_an_out_that_cannot_be_made_is_refused_before_any_scoring(evaluation_inputs, capsys, monkeypatch):
    """Scoring takes minutes to hours: an --out that cannot be created (a file in the way, a
    read-only mount) stops the evaluation before it, not after."""
    import CDTG.evaluation as evaluation_module

    root = evaluation_inputs
    mkdir = Path.mkdir

    def read_only_mount(path, *args, **kwargs):
        if root / "mount" in (path, *path.parents):
            raise OSError(30, "Read-only file system")
        return mkdir(path, *args, **kwargs)

    scored = []
    monkeypatch.setattr(Path, "mkdir", read_only_mount)
    monkeypatch.setattr(evaluation_module, "evaluate_folders", lambda *args, **kwargs: scored.append(1))
    with pytest.raises(SystemExit):
        evaluate_script.main([str(root / "gen_shifted"), "--data", str(root / "cdtg_data"), "--clip", "none",
                              "--lpips", "none", "--inception", "none", "--device", "cpu", "--workers", "0", "--out",
                              str(root / "mount" / "evaluation")])
    assert "cannot create it (Read-only file system)" in capsys.readouterr().err and not scored


def test_an_out_inside_the_dataset_is_refused(evaluation_inputs, capsys):
    root = evaluation_inputs
    data_root = load_tail_classes(root / "cdtg_data").data_root
    err = exit_message(capsys, evaluate_script.main, [
        str(root / "gen_shifted"), "--data", str(root / "cdtg_data"), "--clip", "none", "--lpips", "none",
        "--inception", "none", "--device", "cpu", "--workers", "0", "--out", str(data_root / "anno")])
    assert err.endswith("write beside the dataset, not into it (e.g. runs/NAME/...)")
    assert not list((data_root / "anno").glob("evaluation*")) and not (data_root / "anno" / "options.json").exists()


def test_evaluate_with_clip_refuses_two_classes_of_one_prompt(evaluation_inputs, capsys):
    """CLIP accuracy is the nearest prompt's class: of two classes of one prompt, one could
    never be counted right."""
    root = evaluation_inputs
    manifest = root / "cdtg_data" / "tail_classes.json"
    recorded = json.loads(manifest.read_text())
    recorded["classes"][1]["prompt"] = recorded["classes"][0]["prompt"]
    manifest.write_text(json.dumps(recorded))
    common = [str(root / "gen_shifted"), "--data", str(root / "cdtg_data"), "--lpips", "none", "--inception", "none",
              "--device", "cpu", "--workers", "0"]
    err = exit_message(capsys, evaluate_script.main, [*common, "--clip", str(root / "clip.pt"),
                                                       "--out", str(root / "with_clip")])
    assert "two tail classes have the prompt" in err and not (root / "with_clip").exists()
    evaluate_script.main([*common, "--clip", "none", "--out", str(root / "without_clip")])  # prompts unread


def test_evaluate_reads_what_training_read_and_compares_with_the_folders_own_tail_data(evaluation_inputs, capsys):
    """--skip-bad-images leaves out an unreadable real image, as training and generation
    can; a folder generated from another tail data that still exists is refused; an
    unreadable generated image is one line that says how to write it again."""
    root = evaluation_inputs
    common = ["--clip", "none", "--lpips", "none", "--inception", "none", "--device", "cpu", "--workers", "0"]
    tail = load_tail_classes(root / "cdtg_data")
    bad = Path(tail.samples()[0][0])
    bad.write_bytes(b"not an image")
    with pytest.raises(SystemExit):
        evaluate_script.main([str(root / "gen_shifted"), *common, "--out", str(root / "e1")])
    assert f"cannot read image {bad}" in capsys.readouterr().err
    evaluation = evaluate_script.main([str(root / "gen_shifted"), *common, "--out", str(root / "e1"),
                                       "--skip-bad-images"])
    assert [row["real_images"] for row in evaluation["folders"][0]["classes"]] == [7, 4, 4]

    shutil.copytree(root / "cdtg_data", root / "other_data")
    settings = json.loads((root / "gen_shifted" / "generation.json").read_text())
    (root / "gen_shifted" / "generation.json").write_text(json.dumps({**settings, "data": str(root / "other_data")}))
    with pytest.raises(SystemExit):
        evaluate_script.main([str(root / "gen_copy"), str(root / "gen_shifted"), *common, "--out", str(root / "e2")])
    assert "gen_shifted was generated from the tail data" in capsys.readouterr().err
    assert not (root / "e2").exists()

    # A generated image is rewritten, not skipped: --skip-bad-images is for real images.
    rewrite = "delete it and run CDTG/generation.py again with the same flags"
    for index in (1, 0):  # a later image (read in batches) and the first (read for the size)
        (root / "gen_copy" / "2" / image_name(index)).write_bytes(b"not an image")
        with pytest.raises(SystemExit):
            evaluate_script.main([str(root / "gen_copy"), *common, "--out", str(root / "e3"), "--skip-bad-images"])
        error = capsys.readouterr().err
        assert f"error: cannot read image {root / 'gen_copy' / '2' / image_name(index)}" in error
        assert rewrite in error and "--skip-bad-images" not in error


def test_one_dataloader_reads_every_class_of_every_set(evaluation_inputs, monkeypatch):
    """Its workers start once: under spawn (macOS, Windows) a loader per class and folder
    started them 9 times here. Read by 2 workers, the scores are those read in the process.
    They start with Ctrl-C held, as the trainers' do: spawned, each takes seconds to start,
    and a Ctrl-C then printed a traceback from every one."""
    import contextlib

    root = evaluation_inputs
    common = [str(root / "gen_copy"), str(root / "gen_shifted"), "--clip", "none", "--inception", "none",
              "--device", "cpu", "--pairs", "6", "--batch", "2"]
    loaders, events = [], []

    class CountedLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            loaders.append(kwargs.get("num_workers"))
            super().__init__(*args, **kwargs)

        def __iter__(self):
            events.append("workers start")
            return super().__iter__()

    @contextlib.contextmanager
    def held(workers):
        events.append(("held", workers))
        yield
        events.append("released")

    monkeypatch.setattr(torch.utils.data, "DataLoader", CountedLoader)
    monkeypatch.setattr(CDTG.evaluation, "workers_starting", held)
    torch.manual_seed(0)  # the same random LPIPS trunk for both
    read_by_workers = evaluate_script.main([*common, "--workers", "2", "--out", str(root / "e1")])
    assert loaders == [2] and events == [("held", 2), "workers start", "released"]
    torch.manual_seed(0)
    read_here = evaluate_script.main([*common, "--workers", "0", "--out", str(root / "e2")])
    for by_workers, here in zip(read_by_workers["folders"], read_here["folders"]):
        assert by_workers["classes"] == here["classes"] and by_workers["overall"] == here["overall"]
    assert [row["generated_images"] for row in read_here["folders"][1]["classes"]] == [5, 5, 5]


def test_the_sample_sheet_shows_names_with_dollar_signs_as_written(tmp_path, monkeypatch):
    import CDTG.eval_report as eval_report
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    drawn = []
    monkeypatch.setattr(eval_report, "FigureCanvasAgg", lambda figure: drawn.append(figure) or FigureCanvasAgg(figure))
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    eval_report.plot_sample_sheet({"real": {3: images}, "gen $1$": {3: images}}, [3], ["coins 50$ & 100$"],
                                  tmp_path / "sheet.png")
    texts = [text for text in drawn[0].findobj(Text) if "$" in text.get_text()]
    assert {text.get_text() for text in texts} >= {"3 coins 50$ & 100$", "gen $1$"}
    assert not any(text.get_parse_math() for text in texts)


def test_teacher_accuracy_counts_the_images_put_in_their_own_class(evaluation_inputs):
    """An M_T rigged to answer 'dam' (tail label 1) whatever the image: its accuracy is 1
    on the dam images and 0 on the others, real and generated alike."""
    from tgn.checkpoint import load_checkpoint

    root = evaluation_inputs
    checkpoint = load_checkpoint(root / "M_T.pth")
    checkpoint["state_dict"]["fc.weight"].zero_()
    checkpoint["state_dict"]["fc.bias"].copy_(torch.tensor([0.0, 1.0, 0.0]))
    torch.save(checkpoint, root / "dam_only.pth")
    evaluation = evaluate_script.main([str(root / "gen_shifted"), "--teacher", str(root / "dam_only.pth"),
                                       "--clip", "none", "--lpips", "none", "--inception", "none", "--device", "cpu",
                                       "--workers", "0", "--out", str(root / "evaluation")])
    folder = evaluation["folders"][0]
    assert [row["id"] for row in folder["classes"]] == [2, 3, 4]  # 3 is the dam
    assert [row["teacher_accuracy_generated"] for row in folder["classes"]] == [0.0, 1.0, 0.0]
    assert [row["teacher_accuracy_real"] for row in folder["classes"]] == [0.0, 1.0, 0.0]
    assert folder["overall"]["teacher_accuracy_generated"] == pytest.approx(5 / 15)
    assert folder["overall"]["teacher_accuracy_real"] == pytest.approx(4 / 16)  # 8, 4 and 4 real images


def test_evaluate_refuses_a_missing_or_unfinished_folder_and_notes_one_of_fewer_classes(evaluation_inputs, capsys,
                                                                                       monkeypatch):
    root = evaluation_inputs
    common = ["--clip", "none", "--inception", "none", "--device", "cpu", "--workers", "0", "--pairs", "4"]
    with pytest.raises(SystemExit):
        evaluate_script.main([str(root / "nowhere"), *common, "--out", str(root / "e0")])
    assert capsys.readouterr().err.strip() == f"error: generated folder not found: {root / 'nowhere'}"
    with pytest.raises(SystemExit):  # a dataset, say: named for what it is, not for a checkpoint it lacks
        evaluate_script.main([str(root / "data"), *common, "--out", str(root / "e0")])
    assert capsys.readouterr().err.strip() == (f"error: {root / 'data'}: no anno.txt; is it a CDTG/generation.py "
                                               "output folder?")
    (root / "gen_shifted" / "generation.unfinished").touch()
    with pytest.raises(SystemExit):
        evaluate_script.main([str(root / "gen_shifted"), *common, "--out", str(root / "e1")])
    assert "holds generation.unfinished: its generation.py run stopped" in capsys.readouterr().err
    (root / "gen_shifted" / "generation.unfinished").unlink()
    with pytest.raises(SystemExit):  # its rows would repeat, its samples fill one column group
        evaluate_script.main([str(root / "gen_shifted"), str(root / "gen_shifted") + "/", *common, "--out",
                              str(root / "e1")])
    assert f"is given twice (also as {root / 'gen_shifted'})" in capsys.readouterr().err
    loading = CDTG.evaluation.load_lpips
    monkeypatch.setattr(CDTG.evaluation, "load_lpips", lambda spec: pytest.fail("loaded AlexNet first"))
    with pytest.raises(SystemExit):  # AlexNet has nothing to pool below 31 px: refused before it is loaded
        evaluate_script.main([str(root / "gen_shifted"), *common, "--out", str(root / "e2"), "--size", "16"])
    assert "LPIPS (AlexNet) needs images of at least 31 px, these are 16 px" in capsys.readouterr().err
    monkeypatch.setattr(CDTG.evaluation, "load_lpips", loading)
    anno = root / "gen_shifted" / "anno.txt"
    anno.write_text("".join(line + "\n" for line in anno.read_text().splitlines() if not line.startswith("3/")))
    evaluation = evaluate_script.main([str(root / "gen_shifted"), *common, "--out", str(root / "e3"), "--size", "31"])
    assert "r=0.8 holds images of the tail classes [2, 4] only (of [2, 3, 4]): its overall row covers those " \
           "classes." in evaluation["notes"]


def test_lpips_pairs_are_never_an_image_with_itself():
    """Catches random partners drawn from 0..count-1 (40 pairs of 10 images give about 4
    self-pairs of LPIPS 0), and random pairs where all pairs fit exactly."""
    for seed in range(5):
        pairs = sample_pairs(10, 40, seed)
        assert pairs.shape == (40, 2) and (pairs[:, 0] != pairs[:, 1]).all()
    assert sample_pairs(4, 6, 0).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]


def test_rows_report_each_sets_own_lpips_and_equal_counts_use_every_image():
    """Catches lpips_real / lpips_generated swapped, overall subsets drawn with
    replacement: with equal counts the overall FID is the FID of the whole sets."""
    rng = np.random.default_rng(0)
    real = SetScores(6, features=rng.normal(0, 1, (6, 3)), lpips=0.2)
    generated = SetScores(6, features=rng.normal(1, 1, (6, 3)), lpips=0.6)
    row = class_row(3, "dam", real, generated)
    assert row["lpips_generated"] == 0.6 and row["lpips_real"] == 0.2
    assert overall_row({3: real}, {3: generated})["fid"] == pytest.approx(fid(real.features, generated.features))


def test_a_generation_checkpoint_gone_is_named_as_gone(evaluation_inputs, capsys):
    """A folder of an earlier version records its inputs only through its checkpoint: one
    moved away is said to be missing, not to record nothing."""
    root = evaluation_inputs
    settings = json.loads((root / "gen_shifted" / "generation.json").read_text())
    for key in ("data", "teacher"):
        settings.pop(key, None)
    (root / "gen_shifted" / "generation.json").write_text(json.dumps({**settings, "ckpt": str(root / "moved.pt")}))
    common = [str(root / "gen_shifted"), "--clip", "none", "--lpips", "none", "--inception", "none", "--device", "cpu",
              "--workers", "0", "--out", str(root / "evaluation")]
    with pytest.raises(SystemExit):
        evaluate_script.main(common)
    assert (f"no tail data: its generation checkpoint {root / 'moved.pt'} is not found (moved?); pass --data"
            in capsys.readouterr().err)
    with pytest.warns(UserWarning, match="M_T accuracy skipped: no --teacher, and its generation checkpoint .* is not "
                                         r"found \(moved\?\)"):
        evaluate_script.main([*common, "--data", str(root / "cdtg_data")])


def test_features_and_lpips_see_the_images_in_minus_one_to_one():
    """Inception (its own input transform off), LPIPS and the models Evaluator scores with
    take images in [-1, 1] at the standard FID size."""
    import CDTG.fidelity
    from CDTG.fidelity import mean_pairwise_lpips, sample_pairs

    assert CDTG.fidelity.INCEPTION_SIZE == 299 and inception_pool_network().transform_input is False
    identity = FeatureExtractor(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), 8, "id")
    assert identity(-torch.ones(1, 3, 4, 4)).tolist() == [[-1.0, -1.0, -1.0]]

    class MeanDifference(nn.Module):  # a stand-in for LPIPS: one value per pair
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(1))

        def forward(self, first, second):
            return (first - second).abs().mean((1, 2, 3), keepdim=True)

    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    pairs = sample_pairs(5, 10, 0)
    by_hand = np.mean([(images[i].double() - images[j].double()).abs().mean().item() / 127.5 for i, j in pairs])
    assert mean_pairwise_lpips(MeanDifference(), images, 10, 0, batch_size=3) == pytest.approx(by_hand)


def test_rows_take_each_side_s_own_scores_and_pool_the_classes_the_folder_holds():
    row = class_row(3, "dam", SetScores(4, clip_correct=1, teacher_correct=2), SetScores(4, clip_correct=3,
                                                                                         teacher_correct=4))
    assert (row["clip_accuracy_real"], row["clip_accuracy_generated"]) == (0.25, 0.75)
    assert (row["teacher_accuracy_real"], row["teacher_accuracy_generated"]) == (0.5, 1.0)
    sets = {1: SetScores(4, lpips=0.1, teacher_correct=2), 2: SetScores(4, lpips=0.2, teacher_correct=3),
            3: SetScores(4, lpips=0.6, teacher_correct=0)}
    together = pooled(sets, [1, 2, 3])
    assert together.lpips == pytest.approx(0.3) and together.teacher_correct == 5 and together.count == 12
    # Only the classes the folder holds count, one generated image included.
    real = {3: SetScores(4, teacher_correct=4), 5: SetScores(4, teacher_correct=0), 6: SetScores(4, teacher_correct=0)}
    generated = {3: SetScores(4, teacher_correct=4), 5: SetScores(0, teacher_correct=0),
                 6: SetScores(1, teacher_correct=1)}
    overall = overall_row(real, generated)
    assert (overall["real_images"], overall["generated_images"]) == (8, 5)
    assert overall["fid_images"] == 4 + 1  # of each class the smaller set
    assert overall["teacher_accuracy_real"] == 0.5 and overall["teacher_accuracy_generated"] == 1.0


def test_small_fid_sets_are_marked_and_notes_follow_the_metrics_scored():
    """A row of an earlier version (no fid_images) is marked by its smaller set; without
    Inception no note explains FID's or KID's figures."""
    from argparse import Namespace

    from CDTG.eval_report import metric_notes

    row = {"id": 3, "name": "dam", "real_images": 200, "generated_images": 50, "fid": 3.0, "kid": 0.001,
           **{key: None for key in ("lpips_generated", "lpips_real", "clip_accuracy_generated", "clip_accuracy_real",
                                    "teacher_accuracy_generated", "teacher_accuracy_real")}}
    evaluation = {"feature_extractor": "x", "lpips": None, "clip": None, "teacher": None, "notes": [],
                  "folders": [{"label": "r=0.05", "path": "g", "classes": [row], "overall": {**row, "id": "all"}}]}
    assert "| 3.00 * |" in evaluation_markdown(evaluation)
    args = Namespace(max_per_class=500, pairs=1000)
    without = Evaluator(inception=None, lpips=None, clip=None, teacher=None, device=torch.device("cpu"))
    notes = metric_notes(args, without)
    assert notes and not any("KID" in note or "overall FID" in note or "Inception" in note for note in notes)


def test_the_scoring_models_see_the_images_as_m_t_trained_on_them():
    """Evaluator hands M_T (and CLIP and Inception) the images in [-1, 1], as M_T trained."""
    from tgn.images import normalize_pixels

    seen = []

    class Recording(nn.Module):
        def forward(self, batch):
            seen.append(batch)
            return (torch.zeros(len(batch), 3),)

    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    evaluator = Evaluator(inception=None, lpips=None, clip=None, teacher=Recording(), device=torch.device("cpu"),
                          batch_size=2)
    assert evaluator.score(images, 0, [0, 3]).teacher_correct == 5  # label 0 is every argmax of zeros
    assert torch.equal(torch.cat(seen), normalize_pixels(images))
