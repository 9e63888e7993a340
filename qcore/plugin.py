"""The core's own default hook implementations, loaded like any plugin (name ``qcore``)."""

from __future__ import annotations

from typing import Any

from qcore.hookspecs import hookimpl


@hookimpl(trylast=True)
def insert_observers(model: Any, is_qat: bool) -> Any:
    from qcore.passes.insert_observers import insert_observers as insert

    # prepare_pt2e hands the hook its own copy of the user's model: rewrite it in place
    return insert(model, is_qat=is_qat, in_place=True)


@hookimpl
def fuse_qat(model: Any, is_qat: bool) -> bool:
    from qcore.passes.fuse_conv_bn_qat import fuse_conv_bn_qat

    return fuse_conv_bn_qat(model) if is_qat else False
