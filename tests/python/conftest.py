import pytest

from mesh import Mesh


@pytest.fixture()
def mesh():
    m = Mesh().start()
    yield m
    m.stop()
