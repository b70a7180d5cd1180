from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real Twitter2015 / Twitter2017 text (../shared/data); tests using it skip where it is absent."""
    if not (SHARED_DATA / "twitter2015" / "train.txt").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
