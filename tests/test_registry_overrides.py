"""The registry override switches in-process: apply() puts our classes under mmdet's stock names,
restore() gives back exactly what they held, overridden() does either for a block; import applies it
unless MMDET_DCNV2_OVERRIDE=0."""

import pytest

pytest.importorskip("mmdet")
mmcv_ops = pytest.importorskip("mmcv.ops")

from mmdet.models.roi_heads.roi_extractors import GenericRoIExtractor, SingleRoIExtractor  # noqa: E402
from mmdet.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS  # noqa: E402
from mmengine.optim import DefaultOptimWrapperConstructor  # noqa: E402

from mmdet_dcnv2 import registry_overrides  # noqa: E402
from mmdet_dcnv2.engine import DCNv2OptimWrapperConstructor  # noqa: E402
from mmdet_dcnv2.models import DConv, DPool, MDConv, MDPool, RegistryGenericRoIExtractor, RegistrySingleRoIExtractor  # noqa: E402  # noqa: E402

OURS = {
    "DCNv2": MDConv,
    "DCN": DConv,
    "ModulatedDeformRoIPoolPack": MDPool,
    "DeformRoIPoolPack": DPool,
    "SingleRoIExtractor": RegistrySingleRoIExtractor,
    "GenericRoIExtractor": RegistryGenericRoIExtractor,
}
STOCK = {
    "DCNv2": mmcv_ops.ModulatedDeformConv2dPack,
    "DCN": mmcv_ops.DeformConv2dPack,
    "ModulatedDeformRoIPoolPack": None,
    "DeformRoIPoolPack": None,  # mmcv.ops classes, not registered
    "SingleRoIExtractor": SingleRoIExtractor,
    "GenericRoIExtractor": GenericRoIExtractor,
}


@pytest.fixture(autouse=True)
def applied_afterwards():
    """Whatever a test does, the rest of the session sees the state import left: applied."""
    assert registry_overrides.is_applied()
    yield
    registry_overrides.apply()


def _resolved():
    return {name: MODELS.get(name) for name in OURS}


def test_restore_gives_back_what_the_names_held_and_apply_puts_ours_again():
    assert _resolved() == OURS
    assert OPTIM_WRAPPER_CONSTRUCTORS.get("DefaultOptimWrapperConstructor") is DCNv2OptimWrapperConstructor
    registry_overrides.restore()
    assert not registry_overrides.is_applied()
    assert _resolved() == STOCK
    assert OPTIM_WRAPPER_CONSTRUCTORS.get("DefaultOptimWrapperConstructor") is DefaultOptimWrapperConstructor
    # mmcv's layers come from mmengine's root registry again, not from a copy in mmdet's table
    assert "DCNv2" not in MODELS._module_dict and "ModulatedDeformRoIPoolPack" not in MODELS._module_dict
    assert MODELS.get("MDConv") is MDConv and MODELS.get("RegistrySingleRoIExtractor") is RegistrySingleRoIExtractor
    registry_overrides.restore()  # twice is once
    assert _resolved() == STOCK
    assert registry_overrides.apply() == dict(OURS, DefaultOptimWrapperConstructor=DCNv2OptimWrapperConstructor)
    registry_overrides.apply()  # twice is once: restore() still finds the stock classes
    assert _resolved() == OURS
    registry_overrides.restore()
    assert _resolved() == STOCK


def test_overridden_switches_for_the_block_and_back_even_on_error():
    with registry_overrides.overridden(False):
        assert _resolved() == STOCK
        with registry_overrides.overridden():
            assert _resolved() == OURS
        assert _resolved() == STOCK
    assert _resolved() == OURS
    with pytest.raises(KeyError), registry_overrides.overridden(False):
        raise KeyError("inside")
    assert _resolved() == OURS and registry_overrides.is_applied()


@pytest.mark.parametrize("value, applied", [("0", False), ("1", True), (" 1 ", True), (None, True)])
def test_import_applies_it_unless_the_environment_opts_out_and_logs_which(monkeypatch, value, applied):
    logged = []
    monkeypatch.setattr(registry_overrides, "print_log", lambda message, **kwargs: logged.append(message))
    if value is None:
        monkeypatch.delenv(registry_overrides.OVERRIDE_ENV, raising=False)
    else:
        monkeypatch.setenv(registry_overrides.OVERRIDE_ENV, value)
    with registry_overrides.overridden(False):  # as before `import mmdet_dcnv2`
        replaced = registry_overrides.apply_from_environment()
        assert registry_overrides.is_applied() == applied
        assert _resolved() == (OURS if applied else STOCK)
    assert (replaced != {}) == applied
    assert len(logged) == 1
    assert ("DCNv2 -> MDConv" in logged[0]) == applied and ("left as it was" in logged[0]) != applied


def test_a_bad_environment_value_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(registry_overrides.OVERRIDE_ENV, "no")
    with pytest.raises(ValueError, match="MMDET_DCNV2_OVERRIDE must be 0 .* or 1"):
        registry_overrides.apply_from_environment()
    assert registry_overrides.is_applied()  # left as it was
