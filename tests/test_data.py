"""Finding labeled data: folders, CSVs, dict.txt, the stable split, refusals."""

from pathlib import Path

import pytest

from petal.data import EVAL, TEST, TRAIN, Columns, assign_split, expand_inputs, load_dataset, read_labels_file
from petal.errors import DataError, PetalError


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_classes_and_ignored_files(tmp_path):
    for c in ("b_class", "a_class"):
        for i in range(5):
            touch(tmp_path / c / f"img{i}.JPG")
    touch(tmp_path / "a_class" / "notes.txt")
    touch(tmp_path / "a_class" / "nested" / "deep.png")
    (tmp_path / "empty_class").mkdir()
    ds = load_dataset(tmp_path, eval_percent=0)
    assert ds.classes == ["a_class", "b_class"]  # sorted; the empty class left out
    assert len(ds.examples) == 11
    assert ds.skipped_reasons() == {"not an image file extension": 1}
    assert any("empty_class" in w for w in ds.warnings)


def test_split_is_stable_and_by_name(tmp_path):
    names = [f"photo_{i}.jpg" for i in range(2000)]
    split = [assign_split(n, 10.0) for n in names]
    assert 0.07 < split.count(EVAL) / len(names) < 0.13
    # the same name in another folder, or with retrain.py's _nohash_ suffix, lands the same
    assert [assign_split(f"/other/dir/{n}", 10.0) for n in names] == split
    assert assign_split("a/photo_7_nohash_3.jpg", 10.0) == assign_split("photo_7.jpg", 10.0)
    # a larger eval share only moves images into eval, never out of it
    assert all(assign_split(n, 20.0) == EVAL for n, s in zip(names, split) if s == EVAL)


def test_csv_with_header_dict_and_relative_paths(tmp_path):
    for c in ("cat", "dog", "bird"):
        for i in range(3):
            touch(tmp_path / "imgs" / f"{c}{i}.png")
    rows = ["uri,label"] + [f"imgs/{c}{i}.png,{c}" for c in ("cat", "dog", "bird") for i in range(3)]
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dict.txt").write_text("dog\ncat\n")
    ds = load_dataset(tmp_path / "all.csv", labels_file=tmp_path / "dict.txt", eval_percent=0)
    assert ds.classes == ["dog", "cat"]  # dict order gives the ids
    assert len(ds.examples) == 6
    assert all(Path(e.uri).is_absolute() and Path(e.uri).exists() for e in ds.examples)
    assert sum("not in the labels file" in r for _, r in ds.skipped) == 3


def test_csv_without_header_and_explicit_eval(tmp_path):
    for c in ("x", "y"):
        for i in range(2):
            touch(tmp_path / f"{c}{i}.jpg")
    (tmp_path / "train.csv").write_text("x0.jpg,x\ny0.jpg,y\n")
    (tmp_path / "eval.csv").write_text("x1.jpg,x\ny1.jpg,y\n")
    ds = load_dataset(tmp_path / "train.csv", eval_source=tmp_path / "eval.csv")
    assert [e.split for e in ds.examples] == [TRAIN, TRAIN, EVAL, EVAL]


def test_refusals_are_specific(tmp_path):
    touch(tmp_path / "only" / "a.jpg")
    with pytest.raises(DataError, match="at least 2 classes"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="no such folder or CSV"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(PetalError, match=r"eval_percent: expected a number in \[0, 100\), got 150"):
        load_dataset(tmp_path, eval_percent=150)
    touch(tmp_path / "other" / "b.jpg")
    # with everything in eval, a class has no training image
    with pytest.raises(DataError, match="no training image"):
        load_dataset(tmp_path, eval_percent=99.99)


def test_labels_file_problems(tmp_path):
    (tmp_path / "d.txt").write_text("a\n\nb\na\n")
    with pytest.raises(DataError, match="line 4 repeats label 'a' from line 1"):
        read_labels_file(tmp_path / "d.txt")
    (tmp_path / "d.txt").write_text("a\n\nb\n")
    labels, warnings = read_labels_file(tmp_path / "d.txt")
    assert labels == ["a", "b"] and "blank line 2" in warnings[0]


def test_expand_inputs(tmp_path):
    touch(tmp_path / "f" / "a.jpg")
    touch(tmp_path / "f" / "sub" / "b.PNG")
    touch(tmp_path / "f" / "c.txt")
    (tmp_path / "list.csv").write_text("uri\nf/a.jpg\n")
    uris, problems = expand_inputs([str(tmp_path / "f"), str(tmp_path / "list.csv"),
                                    str(tmp_path / "f" / "*.jpg"), str(tmp_path / "nothing*.jpg")])
    assert [Path(u).name for u in uris] == ["a.jpg", "b.PNG", "a.jpg", "a.jpg"]
    assert problems == [f"{tmp_path / 'nothing*.jpg'}: the pattern matched no file"]


def test_split_folders_are_the_split_not_classes(tmp_path):
    for split, n in (("train", 6), ("valid", 2), ("test", 3)):
        for c in ("cats", "dogs"):
            for i in range(n):
                touch(tmp_path / split / c / f"{split}_{c}_{i}.jpg")
    ds = load_dataset(tmp_path, eval_percent=50)  # the given split wins over the hash
    assert ds.classes == ["cats", "dogs"]  # not "train", "valid", "test"
    counts = ds.counts()
    assert [counts["cats"][k] for k in (TRAIN, EVAL, TEST)] == [6, 2, 3]
    assert any("split folders" in n for n in ds.notes) and not ds.warnings  # information, not a warning


def test_csv_split_column(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        touch(tmp_path / name)
    (tmp_path / "data.csv").write_text("uri,label,split\na.jpg,x,train\nb.jpg,y,train\nc.jpg,x,val\n"
                                       "d.jpg,y,test\ne.jpg,x,holdout\n")
    ds = load_dataset(tmp_path / "data.csv")
    assert {Path(e.uri).name: e.split for e in ds.examples} == {"a.jpg": TRAIN, "b.jpg": TRAIN, "c.jpg": EVAL,
                                                                "d.jpg": TEST}
    assert any("'holdout' is not one of" in reason for _, reason in ds.skipped)


def test_group_keeps_a_burst_on_one_side(tmp_path):
    for shoot in range(40):
        for frame in range(3):
            touch(tmp_path / ("a" if shoot % 2 else "b") / f"shoot{shoot}_{frame}.jpg")
    plain = load_dataset(tmp_path, eval_percent=30)
    grouped = load_dataset(tmp_path, eval_percent=30, group=r"^(shoot\d+)_")
    def sides(ds):
        by_shoot = {}
        for e in ds.examples:
            by_shoot.setdefault(Path(e.uri).name.split("_")[0], set()).add(e.split)
        return by_shoot
    assert all(len(s) == 1 for s in sides(grouped).values())
    assert any(len(s) == 2 for s in sides(plain).values())  # without it, bursts straddle the split
    with pytest.raises(DataError, match="group: expected a regular expression"):
        load_dataset(tmp_path, group="(unclosed")


def test_a_third_csv_column_is_a_split_only_under_a_split_header(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        touch(tmp_path / name)
    (tmp_path / "extra.csv").write_text("uri,label,width\na.jpg,x,640\nb.jpg,y,480\n")
    ds = load_dataset(tmp_path / "extra.csv", eval_percent=0)
    assert len(ds.examples) == 2 and not ds.skipped  # petal 0.1 ignored extra columns; so does this
    (tmp_path / "run_split.csv").write_text("uri,label,split,key\na.jpg,x,calibration,k1\nb.jpg,y,eval,k2\n")
    ds = load_dataset(tmp_path / "run_split.csv", require_train=False)
    assert {Path(e.uri).name: e.split for e in ds.examples} == {"a.jpg": TRAIN, "b.jpg": EVAL}


def test_group_with_an_optional_or_empty_capture_does_not_crash(tmp_path):
    for i in range(4):
        touch(tmp_path / ("a" if i % 2 else "b") / f"img{i}.jpg")
    for pattern in (r"(\d\d)?img", r"x*"):
        assert len(load_dataset(tmp_path, eval_percent=0, group=pattern).examples) == 4


@pytest.mark.parametrize("header,row", [("label,uri", "{label},{uri}"), ("class,filename", "{label},{uri}"),
                                        ("id,filename,class", "7,{uri},{label}"),
                                        ("Image,Category,Split", "{uri},{label},train")])
def test_csv_columns_are_matched_by_header_name(tmp_path, header, row):
    names = {"a.jpg": "cat", "b.jpg": "dog", "c.jpg": "cat", "d.jpg": "dog"}
    for n in names:
        touch(tmp_path / n)
    lines = [header] + [row.format(uri=n, label=lab) for n, lab in names.items()]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(tmp_path / "d.csv", eval_percent=0)
    assert ds.classes == ["cat", "dog"] and {Path(e.uri).name: e.label for e in ds.examples} == names


def test_csv_columns_named_by_the_user(tmp_path):
    names = {"a.jpg": "cat", "b.jpg": "dog"}
    for n in names:
        touch(tmp_path / n)
    lines = ["id,picture,kind"] + [f"{i},{n},{lab}" for i, (n, lab) in enumerate(names.items())]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="are the columns swapped.*--uri-column and --label-column"):
        load_dataset(tmp_path / "d.csv", eval_percent=0)  # no known header names: read by position
    ds = load_dataset(tmp_path / "d.csv", eval_percent=0, columns=Columns("Picture", "kind"))
    assert {Path(e.uri).name: e.label for e in ds.examples} == names
    with pytest.raises(DataError, match=r"--label-column: .*d.csv has no column 'species'; its first row is"):
        load_dataset(tmp_path / "d.csv", columns=Columns("picture", "species"))
    with pytest.raises(DataError, match="--uri-column, --label-column and --split-column name CSV columns; .* is a fo"):
        load_dataset(tmp_path, columns=Columns(uri="picture"))


def test_a_header_with_unknown_names_is_not_read_as_data(tmp_path):
    for n in ("a.jpg", "b.jpg", "c.jpg"):
        touch(tmp_path / n)
    (tmp_path / "d.csv").write_text("picture_loc,flower_kind\na.jpg,cat\nb.jpg,dog\nc.jpg,cat\n")
    with pytest.raises(DataError, match=r"first row \['picture_loc', 'flower_kind'\] looks like a header.*"
                                        r"--uri-column and --label-column"):
        load_dataset(tmp_path / "d.csv")
    (tmp_path / "e.csv").write_text("path,species\na.jpg,cat\n")
    with pytest.raises(DataError, match="has no label column.*or give --uri-column and --label-column"):
        load_dataset(tmp_path / "e.csv")


def test_swapped_columns_are_refused_not_trained_on(tmp_path):
    for n in ("a.jpg", "b.jpg"):
        touch(tmp_path / n)
    (tmp_path / "swapped.csv").write_text("cat,a.jpg\ndog,b.jpg\n")
    with pytest.raises(DataError, match="labels look like file paths .* are the columns swapped"):
        load_dataset(tmp_path / "swapped.csv")
    (tmp_path / "half.csv").write_text("filename,width\na.jpg,3\n")
    with pytest.raises(DataError, match="has no label column"):
        load_dataset(tmp_path / "half.csv")


def test_images_without_class_folders_are_explained(tmp_path):
    for i in range(3):
        touch(tmp_path / f"img{i}.jpg")
    with pytest.raises(DataError, match=r"holds 3 image\(s\) but no class folders: .*roses"):
        load_dataset(tmp_path)


def test_a_class_missing_from_training_with_eval_gets_advice_that_applies(tmp_path):
    for c in ("a", "b"):
        touch(tmp_path / "train" / "a" / f"{c}1.jpg")
        touch(tmp_path / "other" / c / f"{c}2.jpg")
    with pytest.raises(DataError, match="leave them out of --eval") as e:
        load_dataset(tmp_path / "train", eval_source=tmp_path / "other")
    assert "--eval-percent" not in str(e.value)


def test_symbolic_links_out_of_the_data_folder_are_said(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    touch(data / "cats" / "a.jpg")
    touch(data / "cats" / "inside.jpg")
    (data / "cats" / "b.jpg").symlink_to(touch(elsewhere / "b.jpg"))  # a file link out
    (data / "cats" / "same.jpg").symlink_to(data / "cats" / "inside.jpg")  # a link inside: said nothing of
    touch(elsewhere / "dogs" / "c.jpg")
    (data / "dogs").symlink_to(elsewhere / "dogs", target_is_directory=True)  # a class folder out
    ds = load_dataset(data, eval_percent=0)
    assert len(ds.examples) == 5
    said = [w for w in ds.warnings if "symbolic links that lead out of the data folder" in w]
    assert len(said) == 2
    assert "1 image(s) of class 'cats'" in said[0] and f"{data / 'cats' / 'b.jpg'} -> {elsewhere / 'b.jpg'}" in said[0]
    assert "1 image(s) of class 'dogs'" in said[1]


def test_a_split_column_under_a_common_name_is_read_and_an_unused_column_said(tmp_path):
    """Issue 22 item 1: `category,file,subset` was hash-split, training on the test rows."""
    names = [f"{c}{i}.jpg" for c in "xy" for i in range(4)]
    for name in names:
        touch(tmp_path / name)
    subset = ["train", "train", "val", "test"] * 2
    rows = "".join(f"{n[0]},{n},{s},note\n" for n, s in zip(names, subset))
    (tmp_path / "data.csv").write_text("category,file,subset,comment\n" + rows)
    ds = load_dataset(tmp_path / "data.csv", eval_percent=50)
    assert {Path(e.uri).name: e.split for e in ds.examples} == dict(zip(names, [TRAIN, TRAIN, EVAL, TEST] * 2))
    assert any("'comment' not used" in w for w in ds.warnings)
    for word in ("set", "fold", "partition", "stage"):
        (tmp_path / "w.csv").write_text(f"category,file,{word}\n" + "".join(
            f"{n[0]},{n},{s}\n" for n, s in zip(names, subset)))
        assert len(load_dataset(tmp_path / "w.csv").split(TEST)) == 2, word
    (tmp_path / "own.csv").write_text("category,file,origin\n" + "".join(
        f"{n[0]},{n},{s}\n" for n, s in zip(names, subset)))
    ds = load_dataset(tmp_path / "own.csv", columns=Columns(split="origin"))
    assert len(ds.split(TEST)) == 2
    unnamed = load_dataset(tmp_path / "own.csv")
    assert not unnamed.split(TEST) and any("--split-column" in w for w in unnamed.warnings)
    with pytest.raises(DataError, match="--split-column: .* has no column 'part'"):
        load_dataset(tmp_path / "own.csv", columns=Columns(split="part"))


@pytest.mark.parametrize("train,test", [("train", "test"), ("training", "testing"), ("Train", "Test")])
def test_train_and_test_folders_without_val_are_splits_not_classes(tmp_path, train, test):
    """Issue 22 item 2: train/ + test/ trained a model whose classes were "train" and "test"."""
    for split, n in ((train, 4), (test, 2)):
        for c in ("cats", "dogs"):
            for i in range(n):
                touch(tmp_path / split / c / f"{split}_{c}_{i}.jpg")
    ds = load_dataset(tmp_path)
    assert ds.classes == ["cats", "dogs"]
    counts = ds.counts()
    assert [counts["cats"][k] for k in (TRAIN, EVAL, TEST)] == [4, 2, 0]  # test/ is the eval split: said so
    assert any("no val split" in n and "test images are the eval split" in n for n in ds.notes)
    other = tmp_path.parent / f"{tmp_path.name}-other"
    for c in ("cats", "dogs"):
        touch(other / c / f"other_{c}.jpg")
    with_eval = load_dataset(tmp_path, eval_source=other)  # --eval: test/ stays the test split, never trained on
    assert [with_eval.counts()["cats"][k] for k in (TRAIN, EVAL, TEST)] == [4, 1, 2]


def test_class_folders_that_are_all_split_names_are_refused(tmp_path):
    for split in ("test", "val"):  # no train/: not a split layout, and no classes either
        for i in range(3):
            touch(tmp_path / split / f"{split}_{i}.jpg")
    with pytest.raises(DataError, match="split names, not classes"):
        load_dataset(tmp_path)


def test_a_class_spelled_in_another_case_in_val_is_pointed_at(tmp_path):
    """Issue 22 item 10: val/Watch beside train/watch was told to lower --eval-percent."""
    for split, c in (("train", "watch"), ("train", "ring"), ("val", "Watch"), ("val", "ring")):
        for i in range(2):
            touch(tmp_path / split / c / f"{split}_{c}_{i}.jpg")
    with pytest.raises(DataError, match=r"no training image: 'Watch' \(class names differ only in case: "
                                        r"'Watch' vs 'watch'"):
        load_dataset(tmp_path)


def test_predict_reads_a_csv_input_as_train_does(tmp_path):
    """Issue 22 item 5: `petal predict MODEL file.csv` read the first column (the labels) as paths."""
    for name in ("a.jpg", "b.jpg"):
        touch(tmp_path / "photos" / name)
    (tmp_path / "data.csv").write_text("category,file,subset\nx,photos/a.jpg,train\ny,photos/b.jpg,test\n")
    want = [str(tmp_path / "photos" / n) for n in ("a.jpg", "b.jpg")]
    assert expand_inputs([str(tmp_path / "data.csv")]) == (want, [])
    (tmp_path / "named.csv").write_text("kind,picture\nx,photos/a.jpg\ny,photos/b.jpg\n")
    assert expand_inputs([str(tmp_path / "named.csv")], uri_column="Picture") == (want, [])
    (tmp_path / "bare.csv").write_text("photos/a.jpg,x\nphotos/b.jpg,y\n")  # no header: the first column
    assert expand_inputs([str(tmp_path / "bare.csv")]) == (want, [])
    with pytest.raises(DataError, match="--uri-column: .* has no column 'path'"):
        expand_inputs([str(tmp_path / "named.csv")], uri_column="path")


def test_split_folders_inside_class_folders_give_the_split(tmp_path):
    """Found by the new-user trial of issue 22: roses/train/, roses/val/, roses/test/ were hash-split,
    training on the test images."""
    for c in ("roses", "tulips"):
        for split, n in (("train", 4), ("val", 2), ("test", 2)):
            for i in range(n):
                touch(tmp_path / "data" / c / split / f"{c}_{split}_{i}.jpg")
    ds = load_dataset(tmp_path / "data", eval_percent=50)
    assert ds.classes == ["roses", "tulips"]
    assert {Path(e.uri).name: e.split for e in ds.examples} == {
        f"{c}_{s}_{i}.jpg": {"train": TRAIN, "val": EVAL, "test": TEST}[s]
        for c in ("roses", "tulips") for s, n in (("train", 4), ("val", 2), ("test", 2)) for i in range(n)}
    assert any("split folders inside the class folders" in n for n in ds.notes)
    for c in ("roses", "tulips"):  # without val/: test/ is the eval split
        for i in range(2):
            (tmp_path / "data" / c / "val" / f"{c}_val_{i}.jpg").unlink()
    assert {e.split for e in load_dataset(tmp_path / "data").examples} == {TRAIN, EVAL}


def test_a_guessed_split_column_without_split_names_is_not_used(tmp_path):
    """Found by the trial of issue 22: a k-fold `fold` column (0..4) skipped every row."""
    names = [f"{c}{i}.jpg" for c in "xy" for i in range(5)]
    for name in names:
        touch(tmp_path / name)
    (tmp_path / "folds.csv").write_text("file,label,fold\n" + "".join(f"{n},{n[0]},{i % 5}\n" for i, n in
                                                                      enumerate(names)))
    ds = load_dataset(tmp_path / "folds.csv", eval_percent=30)
    assert len(ds.examples) == 10 and not ds.skipped and {e.split for e in ds.examples} <= {TRAIN, EVAL}
    assert any("holds no split names (split '0'" in w for w in ds.warnings)


def test_csv_paths_written_from_the_current_folder_are_explained(tmp_path, monkeypatch):
    """Found by the trial of issue 22: meta/labels.csv naming photos/a.jpg (from the current folder)
    failed every image with "file not found"."""
    for c in ("x", "y"):
        touch(tmp_path / "photos" / f"{c}.jpg")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "labels.csv").write_text("path,label\nphotos/x.jpg,x\nphotos/y.jpg,y\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"relative paths are read from the CSV's folder .*they exist from the "
                                        r"current folder"):
        load_dataset("meta/labels.csv")
    (tmp_path / "meta" / "labels.csv").write_text("path,label\n../photos/x.jpg,x\n../photos/y.jpg,y\n")
    assert len(load_dataset("meta/labels.csv", eval_percent=0).examples) == 2


def test_classes_one_folder_down_are_pointed_at(tmp_path):
    for c in ("roses", "tulips"):
        touch(tmp_path / "data" / "flowers" / c / f"{c}.jpg")
    with pytest.raises(DataError, match=r"one class folder, 'flowers', which holds folders roses, tulips: if those "
                                        r"are the classes, give .*flowers"):
        load_dataset(tmp_path / "data")
    assert load_dataset(tmp_path / "data" / "flowers", eval_percent=0).classes == ["roses", "tulips"]
    assert load_dataset(tmp_path / "data", require_train=False).classes == ["flowers"]  # evaluating: albums are fine
