"""What models, schedulers and the pipeline return: dataclasses read by name or by position.

The tutorial's listing reads results both ways, as transformers and diffusers allow:
`text_encoder(ids)[0]`, `unet(x, t, encoder_hidden_states=c).sample`,
`vae.decode(z).sample`, `scheduler.step(...).prev_sample`. Every output class
of this package derives from `ModelOutput`, so each behaves alike:

    out.sample            the field by name
    out[0], out[1]        the fields that are set (not None), in declaration order
    out["sample"]         the field by name, as a key
    a, b = out            unpacking, over the same fields as indexing
    len(out)              how many fields are set
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Union


class ModelOutput:
    """Base of the output dataclasses: fields by name (`out.sample`) or by position among those set (`out[0]`)."""

    def to_tuple(self) -> tuple:
        """The fields that are not None, in declaration order (what `return_dict=False` returns)."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return tuple(v for v in values if v is not None)

    def __getitem__(self, key: Union[int, slice, str]) -> Any:
        if isinstance(key, str):
            if key not in {f.name for f in dataclasses.fields(self)}:
                raise KeyError(f"{type(self).__name__} has no field {key!r}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())
