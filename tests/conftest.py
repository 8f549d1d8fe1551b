import pytest


@pytest.fixture(scope="session")
def pipeline():
    """One worker's pipeline, built as `crm-pulse worker` builds it, from settings given here."""
    from crm_pulse.agents.worker import build_app
    from crm_pulse.config import Settings

    return build_app(Settings(app_id="crm-pulse", partitions=4))


@pytest.fixture
def app(pipeline):
    return pipeline.app


@pytest.fixture
def settings(pipeline):
    return pipeline.settings
