"""Tests of tfrecords_tools.beam_convert: the Beam pipeline writes what the local converter does.

The pipeline runs on the DirectRunner's engine in this process (one worker), on object storage
(a fake file system registered with Beam), and once through the command line with two worker
processes.
"""

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("apache_beam")

from apache_beam.io.filesystem import FileMetadata, FileSystem  # noqa: E402
from test_convert import HEADER, _broken_cohort, _cohort, _standard_exams  # noqa: E402

from tfrecords_tools import beam_lib, labels_csv, record_cache, schema  # noqa: E402
from tfrecords_tools.convert_lib import ConvertConfig, convert  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(base, root, labels, out, **kwargs):
    """Settings of one run; every run shares the key, so pseudonyms (and records) match."""
    return ConvertConfig(
        dicom_root=str(root),
        labels=str(labels),
        output_dir=str(out),
        pseudonym_key_file=str(base / "private" / "key"),
        id_map=str(base / "private" / f"{os.path.basename(str(out))}_ids.csv"),
        num_workers=1,
        progress=False,
        **kwargs,
    )


def _outputs(config):
    """Every output file's bytes; the manifest without the two paths that name the run."""
    out = {}
    for name in sorted(os.listdir(config.output_dir)):
        path = os.path.join(config.output_dir, name)
        if os.path.isfile(path):
            out[name] = open(path, "rb").read()
    manifest = json.loads(out.pop(schema.MANIFEST_NAME))
    for flag in ("output_dir", "id_map"):
        manifest["flags"].pop(flag)
    private = os.path.dirname(config.id_map)
    with open(config.id_map) as f:
        ids = list(csv.DictReader(f))
    with open(os.path.join(private, "failures_detail.csv")) as f:
        details = [(r["exam_id"], r["exam"]) for r in csv.DictReader(f)]
    return out, manifest, ids, details


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, tiny_cohort_varied):
    """The varied synthetic cohort and the hand-made broken exams under one root, and what the
    local converter makes of them."""
    base = tmp_path_factory.mktemp("beam")
    root = base / "dicom"
    shutil.copytree(tiny_cohort_varied.root, root / "varied")
    ids = _broken_cohort(root / "hand")
    lines = [HEADER]
    for sub in ("varied", "hand"):
        with open(root / sub / "labels.csv") as f:
            lines += [f"{sub}/{line}" for line in f.read().splitlines()[1:]]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    ids |= set(tiny_cohort_varied.identifiers.distinctive)
    local = _config(base, root, root / "labels.csv", base / "local", shard_size_mb=0.15)
    result = convert(local, stream=io.StringIO())
    assert result.num_converted == len(lines) - 1 - 4 and len(result.failures) == 4
    return base, root, ids, local


def test_beam_writes_what_the_local_converter_writes(cohort):
    base, root, ids, local = cohort
    config = _config(base, root, root / "labels.csv", base / "beam", shard_size_mb=0.15)
    log = io.StringIO()
    result = beam_lib.convert(config, [], stream=log)
    assert not result.ok and len(result.failures) == 4
    assert result.num_converted == result.num_labelled - 4
    files, manifest, id_map, details = _outputs(config)
    want_files, want_manifest, want_ids, want_details = _outputs(local)
    # Same shards (names and bytes: same split, same plan), failures.csv, manifest, id map.
    assert sorted(files) == sorted(want_files)
    assert len([n for n in files if n.startswith("train-")]) > 1
    assert files == want_files
    assert manifest == want_manifest
    assert id_map == want_ids and details == want_details
    assert "4 exam(s) failed" in log.getvalue()
    # Privacy: no identifier in any byte under the output dir (shards, manifest, cache) or log.
    blobs = [log.getvalue().encode()]
    for dirpath, _, names in os.walk(config.output_dir):
        blobs += [open(os.path.join(dirpath, n), "rb").read() for n in names]
    for ident in ids:
        assert not any(ident.encode() in blob for blob in blobs), f"{ident!r} leaked"
    assert "hand/" not in log.getvalue() and "varied/" not in log.getvalue()


def test_beam_crops_to_the_body_as_the_local_converter_does(cohort):
    base, root, _, _ = cohort
    configs = {
        name: _config(base, root, root / "labels.csv", base / f"{name}_body", crop_to_body=True)
        for name in ("local", "beam")
    }
    convert(configs["local"], stream=io.StringIO())
    beam_lib.convert(configs["beam"], [], stream=io.StringIO())
    files, manifest, _, _ = _outputs(configs["beam"])
    want_files, want_manifest, _, _ = _outputs(configs["local"])
    assert files == want_files and manifest == want_manifest
    assert manifest["flags"]["crop_to_body"] is True


def test_rerun_resumes_from_the_cache_and_leaves_no_stale_or_partial_shard(tmp_path):
    root = tmp_path / "dicom"
    _cohort(
        str(root), _standard_exams(n_patients=3, exams_per_patient=1) + [("bad/x", 9, (0,) * 4)]
    )
    victim = sorted((root / "bad/x/series1").iterdir())[1]
    moved = tmp_path / "moved.dcm"
    os.replace(victim, moved)
    config = _config(tmp_path, root, root / "labels.csv", tmp_path / "beam")
    first = beam_lib.convert(config, [], stream=io.StringIO())
    assert len(first.failures) == 1 and first.num_converted == 3
    work = tmp_path / "beam" / record_cache.WORK_DIR
    assert len(list(work.glob("*.json"))) == 3  # Kept for the rerun.
    # What a killed run leaves: an unpublished cache record, a shard under its temporary name,
    # and a shard of an earlier plan.
    (work / "0123.tfrecord.tmp-99").write_bytes(b"partial")
    (tmp_path / "beam" / ".tmp-0a1b-train-00000-of-00001.tfrecord").write_bytes(b"partial")
    (tmp_path / "beam" / "train-00003-of-00004.tfrecord").write_bytes(b"old")
    os.replace(moved, victim)
    log = io.StringIO()
    second = beam_lib.convert(config, [], stream=log)
    assert second.ok and second.num_converted == 4 and second.num_cached == 3
    assert "(3 resumed from an earlier run)" in log.getvalue()
    clean = _config(tmp_path, root, root / "labels.csv", tmp_path / "clean")
    convert(clean, stream=io.StringIO())
    assert _outputs(config)[:2] == _outputs(clean)[:2]  # Only the complete shards remain.
    assert not work.exists()  # Every exam converted: the cache is dropped, as locally.


# ---- object storage: Beam's FileSystems with a fake "fakeobj://" store --------------------------


class FakeObjectStore(FileSystem):
    """Object storage like GCS (no folders, listing by prefix) kept in a local folder."""

    ROOT = ""

    @classmethod
    def scheme(cls):
        return "fakeobj"

    def _local(self, path):
        assert path.startswith("fakeobj://"), path
        return os.path.join(self.ROOT, path[len("fakeobj://") :])

    def join(self, basepath, *paths):
        return "/".join([basepath.rstrip("/")] + [p.strip("/") for p in paths])

    def split(self, path):
        return tuple(path.rstrip("/").rsplit("/", 1))

    def mkdirs(self, path):
        pass

    def has_dirs(self):
        return False

    def _list(self, dir_or_prefix):
        for dirpath, _, names in os.walk(self.ROOT):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), self.ROOT)
                path = "fakeobj://" + rel.replace(os.sep, "/")
                if path.startswith(dir_or_prefix):
                    yield self.metadata(path)

    def create(self, path, mime_type=None, compression_type=None):
        os.makedirs(os.path.dirname(self._local(path)), exist_ok=True)
        return open(self._local(path), "wb")

    def open(self, path, mime_type=None, compression_type=None):
        return open(self._local(path), "rb")

    def copy(self, source_file_names, destination_file_names):
        for src, dst in zip(source_file_names, destination_file_names):
            os.makedirs(os.path.dirname(self._local(dst)), exist_ok=True)
            shutil.copyfile(self._local(src), self._local(dst))

    def rename(self, source_file_names, destination_file_names):
        self.copy(source_file_names, destination_file_names)  # As GCS does: copy, delete.
        self.delete(source_file_names)

    def exists(self, path):
        return os.path.isfile(self._local(path))

    def size(self, path):
        return os.path.getsize(self._local(path))

    def last_updated(self, path):
        return os.path.getmtime(self._local(path))

    def checksum(self, path):
        return str(self.size(path))

    def metadata(self, path):
        return FileMetadata(path, self.size(path), self.last_updated(path))

    def delete(self, paths):
        for path in paths:
            os.remove(self._local(path))


def test_object_storage_paths_through_beam_filesystems(cohort, tmp_path, monkeypatch):
    base, root, _, _ = cohort
    monkeypatch.setattr(FakeObjectStore, "ROOT", str(tmp_path / "store"))
    shutil.copytree(root / "hand", tmp_path / "store" / "bucket" / "dicom")
    local = _config(tmp_path, root / "hand", root / "hand" / "labels.csv", tmp_path / "local")
    convert(local, stream=io.StringIO())
    store = tmp_path / "store" / "bucket"
    (store / "private").mkdir()
    shutil.copy(local.pseudonym_key_file, store / "private" / "key")
    remote = ConvertConfig(
        dicom_root="fakeobj://bucket/dicom",
        labels=str(root / "hand" / "labels.csv"),
        output_dir="fakeobj://bucket/records",
        pseudonym_key_file="fakeobj://bucket/private/key",
        progress=False,
    )
    assert remote.id_map_file() == "fakeobj://bucket/private/id_map.csv"
    default_key = ConvertConfig(**{**remote.__dict__, "pseudonym_key_file": ""}).key_file()
    assert default_key == "fakeobj://bucket/records_private/pseudonym.key"
    result = beam_lib.convert(remote, [], stream=io.StringIO())
    assert result.num_converted == 3 and len(result.failures) == 4

    def files(directory):
        return {n: open(directory / n, "rb").read() for n in os.listdir(directory) if n != ".work"}

    local_files, remote_files = files(tmp_path / "local"), files(store / "records")
    assert remote_files.keys() == local_files.keys()  # No temporary file left over.
    manifest = json.loads(remote_files.pop(schema.MANIFEST_NAME))
    want = json.loads(local_files.pop(schema.MANIFEST_NAME))
    assert {k: v for k, v in manifest.items() if k != "flags"} == {
        k: v for k, v in want.items() if k != "flags"
    }
    assert remote_files == local_files  # Shards and failures.csv.
    assert (store / "private" / "id_map.csv").read_text() == open(local.id_map).read()
    detail = (store / "private" / "failures_detail.csv").read_text()
    assert "fakeobj://bucket/dicom/bad/truncated" in detail  # The exam's folder, not a copy.
    assert len(list((store / "records" / record_cache.WORK_DIR).iterdir())) == 6  # Kept: failures.
    # A local id map with a remote output directory: the workers could not write it.
    with pytest.raises(ValueError, match="workers write the id map"):
        beam_lib.convert(
            ConvertConfig(**{**remote.__dict__, "id_map": str(tmp_path / "ids.csv")}), []
        )


def test_listed_tree_checks_labels_like_the_folder_walk(cohort):
    _, root, _, _ = cohort
    files = [
        os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
        for d, _, names in os.walk(root)
        for n in names
    ]

    def head(rel):
        return open(os.path.join(root, rel), "rb").read(132)

    listed, walked = labels_csv.ListedTree(files, head), labels_csv.LocalTree(str(root))
    for labelled in ([], ["hand/P00/E0", "varied/P0001/E1"], ["hand/bad", "hand/P01/E0"]):
        assert listed.unlabelled_folders(labelled) == walked.unlabelled_folders(labelled)
    assert listed.has_folder("hand/bad/no_dce") and not listed.has_folder("hand/bad/nope")


# ---- the command line, with two worker processes ------------------------------------------------


def _cli(args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "tfrecords_tools.beam_convert", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_cli_two_worker_processes_exit_status_and_bad_input(cohort, tmp_path):
    base, root, _, _ = cohort
    local = _config(tmp_path, root / "hand", root / "hand" / "labels.csv", tmp_path / "local")
    convert(local, stream=io.StringIO())
    args = [
        f"--dicom_root={root / 'hand'}",
        f"--labels={root / 'hand' / 'labels.csv'}",
        f"--pseudonym_key_file={local.pseudonym_key_file}",
        f"--id_map={tmp_path / 'private' / 'cli_ids.csv'}",
    ]
    proc = _cli(args + [f"--output_dir={tmp_path / 'cli'}", "--direct_num_workers=2"])
    assert proc.returncode == 1, proc.stderr[-3000:]  # Some exams failed, the rest written.
    assert "converted 3/7 exams" in proc.stderr
    cli = ConvertConfig(**{**local.__dict__, "output_dir": str(tmp_path / "cli")})
    cli = ConvertConfig(**{**cli.__dict__, "id_map": str(tmp_path / "private" / "cli_ids.csv")})
    assert _outputs(cli) == _outputs(local)
    # Bad labels: exit status 2, nothing read; a misspelt flag is not passed on to Beam.
    (tmp_path / "bad.csv").write_text(HEADER + "\nP00/E0,0,0,0,7\n")
    proc = _cli(args[:1] + [f"--labels={tmp_path / 'bad.csv'}", f"--output_dir={tmp_path / 'x'}"])
    assert proc.returncode == 2 and "label values other than 0/1" in proc.stderr
    proc = _cli(args + [f"--output_dir={tmp_path / 'x'}", "--shard_size=5"])
    assert proc.returncode != 0 and "--shard_size=5" in proc.stderr
