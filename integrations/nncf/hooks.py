"""IGQ quantizers as NNCF function-hook modules (``nncf.torch.function_hook``).

Each class is a core quantizer plus NNCF's ``StatefulModuleInterface``: ``get_config`` returns the
constructor arguments, so ``nncf.torch.get_config`` / ``load_from_config`` rebuild the hooks and
``load_state_dict`` restores their ranges and weight codes (pass
``allowed_modules=igq_plugin.integrations.nncf.ALLOWED_MODULES``). Each hook also records the site
it is (``site_record``), so :func:`igq_plugin.integrations.nncf.register_sites` can register the
sites of a restored model. No numerics here: the forward passes are the core's.
"""
from __future__ import annotations

from typing import Any

from nncf.torch.layer_utils import StatefulModuleInterface

import igq_plugin as igq
from igq_plugin.attention import OperandQuantizer

__all__ = ["IGQInputHook", "IGQWeightHook", "IGQOperandHook", "IGQSoftmaxHook", "HOOK_TYPES"]


class _Stateful(StatefulModuleInterface):
    """get_config / from_config from the keyword arguments the hook was built with."""

    _config: dict

    def get_config(self) -> dict[str, Any]:
        return dict(self._config)

    @classmethod
    def from_config(cls, state: dict[str, Any]) -> "_Stateful":
        return cls(**state)


class IGQInputHook(igq.ActQuantizer, _Stateful):
    """The input quantizer of a Linear / patch-embedding Conv2d site (pre-hook, port 0 of its op).
    ``consumer``: the layer's module name; ``kind``: "linear_input" or "conv_input"."""

    def __init__(self, consumer: str, kind: str, **quantizer_kwargs: Any) -> None:
        super().__init__(**quantizer_kwargs)
        self.consumer, self.kind = consumer, kind
        self._config = {"consumer": consumer, "kind": kind, **quantizer_kwargs}

    def site_record(self) -> dict[str, Any]:
        return {"name": self.site, "kind": self.kind, "consumer": self.consumer, "info": {}}


class IGQWeightHook(igq.WeightQuantizer, _Stateful):
    """The weight quantizer of that layer (pre-hook, port 1 of its op); bound to the layer by the adapter."""

    def __init__(self, consumer: str, out_channels: int, w_bits: int, percentile: float, clipping: str) -> None:
        super().__init__(out_channels, w_bits=w_bits, weight_percentile=percentile, weight_clipping=clipping)
        self.consumer = consumer
        self._config = {"consumer": consumer, "out_channels": out_channels, "w_bits": w_bits,
                        "percentile": percentile, "clipping": clipping}


class IGQOperandHook(OperandQuantizer, _Stateful):
    """A Q, K or V operand of an attention matmul (pre-hook on the matmul's port): the core's
    ``quantize_operand`` with the site's ActQuantizer (``quantizer``, the registered one)."""

    def __init__(self, scope: str, tag: str, channel_axis: int, head_dim: int, **quantizer_kwargs: Any) -> None:
        super().__init__(igq.ActQuantizer(**quantizer_kwargs), channel_axis)
        self.scope, self.tag, self.head_dim = scope, tag, head_dim
        self._config = {"scope": scope, "tag": tag, "channel_axis": channel_axis, "head_dim": head_dim,
                        **quantizer_kwargs}

    def site_record(self) -> dict[str, Any]:
        return {"name": self.quantizer.site, "kind": "matmul_operand", "consumer": self.scope,
                "info": {"operand": self.tag, "head_dim": self.head_dim}}


class IGQSoftmaxHook(igq.SoftmaxQuantizer, _Stateful):
    """Post-softmax row groups (pre-hook, port 0 of the P V matmul)."""

    def __init__(self, scope: str, head_dim: int, **quantizer_kwargs: Any) -> None:
        super().__init__(**quantizer_kwargs)
        self.scope, self.head_dim = scope, head_dim
        self._config = {"scope": scope, "head_dim": head_dim, **quantizer_kwargs}

    def site_record(self) -> dict[str, Any]:
        return {"name": self.site, "kind": "softmax", "consumer": self.scope, "info": {"head_dim": self.head_dim}}


HOOK_TYPES = (IGQInputHook, IGQWeightHook, IGQOperandHook, IGQSoftmaxHook)
