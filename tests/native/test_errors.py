"""The error hierarchy and its {type, message} wire form."""

import json

import pytest

from tabmesh.errors import (GGUFError, NeedMoreData, TabmeshError, UnsupportedQuantError,
                            error_class)


def test_hierarchy_and_codes():
    assert issubclass(GGUFError, TabmeshError)
    assert issubclass(UnsupportedQuantError, GGUFError)
    assert issubclass(NeedMoreData, GGUFError)
    codes = {c.code for c in (TabmeshError, GGUFError, UnsupportedQuantError, NeedMoreData)}
    assert len(codes) == 4, "each class has its own code"


@pytest.mark.parametrize("cls", [TabmeshError, GGUFError, UnsupportedQuantError])
def test_round_trip_keeps_class_and_message(cls):
    err = cls("tensor 'blk.0.attn_q.weight': ggml type IQ2_XS is not supported")
    wire = json.loads(json.dumps(err.to_dict()))
    assert wire == {"type": cls.__name__, "message": str(err)}
    back = TabmeshError.from_dict(wire)
    assert type(back) is cls
    assert str(back) == str(err) and back.args == (str(err),)
    with pytest.raises(cls):
        raise back


def test_need_more_data_survives_the_wire_without_its_number():
    err = NeedMoreData(4096)
    assert err.n_bytes_needed == 4096 and "4096" in str(err)
    back = TabmeshError.from_dict(err.to_dict())
    assert isinstance(back, NeedMoreData) and isinstance(back, GGUFError)
    assert str(back) == str(err)
    assert back.n_bytes_needed == 0  # class default: the wire form carries only the message


def test_unknown_type_falls_back_to_base_and_keeps_the_name():
    back = TabmeshError.from_dict({"type": "ErrorFromANewerPeer", "message": "boom"})
    assert type(back) is TabmeshError
    assert "ErrorFromANewerPeer" in str(back) and "boom" in str(back)


@pytest.mark.parametrize("payload", [None, "text", {}, {"type": 3, "message": 4}, {"message": "m"}])
def test_malformed_payloads_give_base_error(payload):
    back = TabmeshError.from_dict(payload)
    assert type(back) is TabmeshError


def test_from_dict_does_not_build_non_error_classes():
    # "Exception" or other names outside the registry must not be instantiated
    for name in ("Exception", "SystemExit", "KeyboardInterrupt", "object"):
        back = TabmeshError.from_dict({"type": name, "message": "x"})
        assert type(back) is TabmeshError


def test_new_subclasses_register_themselves():
    class PeerLostForTestError(TabmeshError):
        code = "peer_lost_for_test"

    assert error_class("PeerLostForTestError") is PeerLostForTestError
    back = TabmeshError.from_dict(PeerLostForTestError("peer 3 went away").to_dict())
    assert type(back) is PeerLostForTestError
    assert error_class("TabmeshError") is TabmeshError
    assert error_class("NoSuchError") is None


def test_duplicate_class_name_from_elsewhere_is_refused():
    with pytest.raises(TypeError, match="already registered"):
        class GGUFError(TabmeshError):  # noqa: F811 - the clash is the point
            pass
    assert error_class("GGUFError").__module__ == "tabmesh.errors"
