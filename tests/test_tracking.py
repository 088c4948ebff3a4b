"""MLflow metadata written by the Tracker: the experiment's kind, input datasets and git source tags. No Ray."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from pipeline.tracking import (
    DATASET_CONTEXT_TAG,
    DATASET_SPLIT_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    Tracker,
    source_tags,
)


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_a_new_experiment_is_marked_as_model_training(uri, tmp_path):
    tracker = Tracker(uri, "fresh", artifact_root=tmp_path / "artifacts")
    tags = tracker.client.get_experiment(tracker.experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_an_existing_experiment_without_a_kind_gets_one_and_a_set_kind_is_kept(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    old = client.create_experiment("old")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert Tracker(uri, "old").experiment_id == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker(uri, "chosen")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_input_dataset_reads_back_from_the_run(uri):
    tracker = Tracker(uri, "data")
    run_id = tracker.start_run("simclr")
    tracker.log_input_dataset(run_id, name="fashion-mnist/train", source="/usr/share/datasets/fashion-mnist",
                              split="train", size=6000, digest="0123456789abcdef", context="training")
    tracker.log_input_dataset(run_id, name="fashion-mnist/test", source="https://example.org/fmnist",
                              split="test", size=2000, digest="f" * 64, context="evaluation")

    inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {"fashion-mnist/train", "fashion-mnist/test"}

    train = by_name["fashion-mnist/train"]
    assert train.dataset.digest == "0123456789abcdef"
    assert train.dataset.source_type == "local"
    assert json.loads(train.dataset.source) == {"uri": "/usr/share/datasets/fashion-mnist"}
    assert json.loads(train.dataset.profile) == {"num_images": 6000, "split": "train"}
    assert {t.key: t.value for t in train.tags} == {DATASET_CONTEXT_TAG: "training", DATASET_SPLIT_TAG: "train"}

    test = by_name["fashion-mnist/test"]
    assert test.dataset.source_type == "http" and json.loads(test.dataset.source) == {"url": "https://example.org/fmnist"}
    assert test.dataset.digest == "f" * 36  # MLflow keeps 36 characters; the profile has the whole fingerprint
    assert json.loads(test.dataset.profile)["fingerprint"] == "f" * 64
    assert {t.key: t.value for t in test.tags}[DATASET_CONTEXT_TAG] == "evaluation"


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary")
def test_source_tags_in_a_git_checkout(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "train.py").write_text("print('hi')\n")
    _git(repo, "add", "train.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m", "first")
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                         text=True).stdout.strip()
    (repo / "sub").mkdir()

    tags = source_tags(repo / "sub")  # any folder inside the checkout
    assert tags["mlflow.source.git.commit"] == sha
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == str(repo.resolve())
    assert tags["mlflow.source.git.branch"] == "main"
    assert tags["mlflow.source.git.dirty"] == "false"
    assert "mlflow.source.git.repoURL" not in tags

    _git(repo, "remote", "add", "origin", "https://user:secret@example.org/team/repo.git")
    (repo / "train.py").write_text("print('changed')\n")
    tags = source_tags(repo)
    assert tags["mlflow.source.git.repoURL"] == "https://example.org/team/repo.git"  # no credentials in a tag
    assert tags["mlflow.source.name"] == "https://example.org/team/repo.git"
    assert tags["mlflow.source.git.dirty"] == "true"
    assert Tracker.source_tags(repo) == tags

    # the tags go onto a run as they are
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "src")
    run_id = tracker.start_run("r", tags=tags)
    assert tracker.client.get_run(run_id).data.tags["mlflow.source.git.commit"] == sha


def test_source_tags_outside_git_or_without_git_are_empty(tmp_path, monkeypatch):
    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # in case tmp_path lies inside a checkout
    assert source_tags(outside) == {}
    assert source_tags(tmp_path / "missing") == {}
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git binary
    assert source_tags(outside) == {}
