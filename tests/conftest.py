import pytest

from test_pretrain import write_image_folder


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The small labelled image folder (train/ and validation/) that the end-to-end tests train and probe on."""
    return write_image_folder(tmp_path_factory.mktemp("imgs"))
