import pytest
import torch

from xattn.registry import ModelIO, load_model, parse_model_args
from xattn.errors import ModelError


def test_seeded_weights_rebuild_exactly_and_seed_matters():
    a, b = load_model(), load_model()
    c = load_model(seed=1)
    for key, value in a.module.state_dict().items():
        assert torch.equal(value, b.module.state_dict()[key])
    assert not torch.equal(a.module.state_dict()["head.weight"], c.module.state_dict()["head.weight"])
    assert a.record()["init_seed"] == 0 and c.record()["init_seed"] == 1


def test_model_args_are_parsed_as_literals():
    assert parse_model_args(["num_heads=4", "kv_channels=None", "name=abc", "scale=0.5"]) == {
        "num_heads": 4, "kv_channels": None, "name": "abc", "scale": 0.5}
    with pytest.raises(ModelError, match="bad --model-arg 'num_heads'"):
        parse_model_args(["num_heads"])


def test_unknown_model_and_argument():
    with pytest.raises(ModelError, match="unknown model 'resnet'.*cross-attention-net"):
        load_model("resnet")
    with pytest.raises(ModelError, match="has no argument heads.*accepted: in_channels"):
        load_model("cross-attention", model_args={"heads": 2})


def test_user_factories():
    model = load_model("tests.user_models:declared")
    assert model.io == ModelIO({"x1": 4, "x2": 4}, ("y",))
    with pytest.raises(ModelError, match="does not declare its inputs"):
        load_model("tests.user_models:undeclared")
    assert load_model("tests.user_models:undeclared", io=ModelIO({"x1": 4, "x2": 4})).io.inputs == {"x1": 4, "x2": 4}
    with pytest.raises(ModelError, match="returned int, not a torch.nn.Module"):
        load_model("tests.user_models:not_a_module")
    with pytest.raises(ModelError, match="cannot import module 'tests.no_such_module'"):
        load_model("tests.no_such_module:make")
    with pytest.raises(ModelError, match="has no attribute 'missing'"):
        load_model("tests.user_models:missing")
