import hffs_neuron


def test_version_is_set():
    assert hffs_neuron.__version__.count(".") == 2
