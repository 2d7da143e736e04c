"""What a wire body set, for the neutral request's `explicit` fields: a model's defaults fill
only the others (core.request.with_defaults)."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel

from lmserve.core.request import explicit_fields


def explicit(body: BaseModel, names: Mapping[str, str] | None = None) -> frozenset[str]:
    """The neutral fields `body` set to a value, among its declared ones (an unknown field
    sets nothing); `names`: its wire name -> neutral name where they differ."""
    declared = type(body).model_fields
    return explicit_fields({key: getattr(body, key) for key in body.model_fields_set
                            if key in declared}, names)
