"""The shared MLflow and Ray session helpers, on a real local Ray."""
from __future__ import annotations

import pytest
import ray

from tagger.sessions import absolute_tracking_uri, ray_session, shown_uri


@pytest.mark.slow  # a real local Ray
def test_ray_session_starts_and_stops_only_its_own_local_ray():
    assert not ray.is_initialized()
    with ray_session() as local:
        assert local and ray.is_initialized()
        with ray_session() as nested:  # already connected: joins, and leaves it running
            assert nested is False
        assert ray.is_initialized()
    assert not ray.is_initialized()


def test_relative_tracking_uris_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert absolute_tracking_uri("mlruns") == str(tmp_path / "mlruns")
    assert absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_a_password_inside_a_tracking_uri_is_never_printed():
    assert shown_uri("postgresql://team:s3cret@db.internal:5432/mlflow") == "postgresql://team:***@db.internal:5432/mlflow"
    assert shown_uri("http://tracking:5000") == "http://tracking:5000"
    assert shown_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
