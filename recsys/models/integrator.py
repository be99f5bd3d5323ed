"""X-Cross (Hadad et al., SIGIR 2025): layer-wise integration of n frozen source-domain models.

Each source model m is the frozen backbone with LoRA source adapter m active. The n models run
side by side; after every transformer layer l an :class:`Integrator` refines each stream with
the others (docs/methods.md, X-Cross steps 1-3)::

    z      = W_concat [h_1; ...; h_n]                                  (2n(n-1) signed scalars)
    h~_m   = h_m + sum_{m' != m} ( beta * a_{m,m'} * h_{m'} + gamma * b_{m,m'} * (h_m - h_{m'}) )

and ``h~_m`` is stream m's input to layer l+1. After the last layer (steps 4-5)
``h_final = sum_m w_m h~_m``, pooled, scored by the shared :class:`~recsys.models.head.ScoringHead`.
Only the integrators, ``w`` and the head train.

How it runs (:class:`XCrossModel`): the n streams are n blocks of ONE batch (rows ``m*B .. m*B+B-1``
are stream m) through the model's own forward, with peft's mixed-adapter batches (each row uses
its own adapter) and the integrators applied by forward hooks on the model's own layer modules,
so the model keeps its own attention masks, positions and final norm. The hooks exist only
inside :meth:`XCrossModel.forward`: outside it the same ``PeftModel`` is a plain LoRA model.

Choices the paper leaves open, each **[ours]** with its switch (default first):
``mode`` ("token" | "pooled"), ``init`` of W_concat ("zero" | "normal"), ``beta = gamma = 1``,
``w_init`` (1/n each), ``normalize`` ("layernorm" | "none"): what W_concat reads, and for decoders
``combine`` ("after_norm" | "before_norm"): where w combines the streams relative to the model's
final norm.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import partial, reduce
from typing import Sequence

import math

import torch
import torch.nn.functional as F
from torch import nn

from recsys.models.backbone import body, transformer_layers, unwrap_peft
from recsys.models.head import ScoringHead, pool


def _route_rows(module, args, kwargs, adapter_names):
    """Forward pre-hook: peft's per-row adapter choice (the ``adapter_names`` kwarg of its LoRA layers)."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _add_block_updates(module, args, output, adapter_names):
    """Forward hook on a peft LoRA ``Linear`` whose adapters are disabled (its output is the frozen
    base layer's): add adapter m's low-rank update to row block m, as a slice (no row gather).
    The same arithmetic as peft's forward: ``base(x) + B(A(dropout(x))) * scaling``."""
    x = args[0]
    n = len(adapter_names)
    rows = x.size(0) // n
    out = output  # in place: a linear layer's backward does not need its output
    for m, name in enumerate(adapter_names):
        a = module.lora_A[name]
        xm = module._cast_input_dtype(x[m * rows:(m + 1) * rows], a.weight.dtype)
        delta = module.lora_B[name](a(module.lora_dropout[name](xm))) * module.scaling[name]
        out[m * rows:(m + 1) * rows] += delta.to(out.dtype)
    return out


def _sliceable(module, adapter_names) -> bool:
    """A plain peft LoRA ``Linear`` holding every stream's adapter as vanilla LoRA (no DoRA-like variant)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return (isinstance(module, LoraLinear) and not module.merged
            and all(a in module.lora_A and a not in module.lora_variant for a in adapter_names))


FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")  # Llama/Qwen, GPT-2, Phi, OPT


def ordered_pairs(n: int) -> list[tuple[int, int]]:
    """The ordered pairs (m, m'), m != m', in the order z stores them: m-major, then m' ascending."""
    return [(m, k) for m in range(n) for k in range(n) if k != m]


class Integrator(nn.Module):
    """One layer's X-Cross integrator for n streams of hidden size d.

    Layout of ``z = W_concat [h_1; ...; h_n]`` (size 2P, P = n(n-1)), with ``pairs = ordered_pairs(n)``
    (for n = 2: (0,1), (1,0); for n = 3: (0,1), (0,2), (1,0), (1,2), (2,0), (2,1))::

        z[k]     = a_{pairs[k]}     direct scalar:      beta  * a_{m,m'} * h_{m'}
        z[P + k] = b_{pairs[k]}     interaction scalar: gamma * b_{m,m'} * (h_m - h_{m'})

    ``W_concat`` has no bias (the paper's z is a pure linear map of the concatenation), and is
    zero-initialised by default **[ours]**, so X-Cross starts as exactly the n source models.
    n = 1 has no parameters and is the identity.

    What W_concat reads **[ours]**: with ``normalize="layernorm"`` (default) the concatenation is
    layer-normalised (no affine weights) and divided by sqrt(n d), a unit vector whatever the
    layer's scale, so one Adam step of size lr moves z by at most about lr sqrt(n d) in every layer:
    the integrators learn at an ordinary learning rate. With ``"none"`` W_concat reads the raw
    hidden states, as the equations are written; their scale (and outlier dimensions) differs from
    layer to layer, and a learning rate small enough for the largest leaves the others unmoved.

    Args:
        n: number of streams (source adapters).
        hidden_size: d.
        beta, gamma: the scales of the direct and interaction terms **[ours]: 1.0**.
        mode: ``"token"`` -> z per token **[ours] default**; ``"pooled"`` -> z from the pooled
            token of each stream (first token for encoders, last non-pad for decoders),
            broadcast over all tokens.
        init: ``"zero"`` (default) or ``"normal"`` (N(0, init_std^2)) for W_concat.
        kind: ``"encoder"`` | ``"decoder"``; only used by ``mode="pooled"`` to find the pooled token.
        normalize: ``"layernorm"`` (default) | ``"none"``: what W_concat reads (see above).
        compile: ``"auto"`` (default: ``torch.compile`` the fused step when the states are on CUDA) |
            ``True`` (everywhere) | ``False``.
    """

    def __init__(
        self,
        n: int,
        hidden_size: int,
        beta: float = 1.0,
        gamma: float = 1.0,
        mode: str = "token",
        init: str = "zero",
        kind: str = "encoder",
        init_std: float = 0.02,
        normalize: str = "layernorm",
        compile: bool | str = "auto",
    ):
        super().__init__()
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be true, false or 'auto', got {compile!r}")
        self.compile = compile
        if mode not in ("token", "pooled"):
            raise ValueError(f"mode must be 'token' or 'pooled', got {mode!r}")
        if normalize not in ("layernorm", "none"):
            raise ValueError(f"normalize must be 'layernorm' or 'none', got {normalize!r}")
        self.normalize = normalize
        if init not in ("zero", "normal"):
            raise ValueError(f"init must be 'zero' or 'normal', got {init!r}")
        self.n, self.hidden_size, self.beta, self.gamma = n, hidden_size, beta, gamma
        self.mode, self.kind = mode, kind
        self.pairs = ordered_pairs(n)
        num_pairs = len(self.pairs)
        if n == 1:
            self.W_concat = None
            return
        self.W_concat = nn.Linear(n * hidden_size, 2 * num_pairs, bias=False)
        if init == "zero":
            nn.init.zeros_(self.W_concat.weight)
        else:
            nn.init.normal_(self.W_concat.weight, std=init_std)
        # where each pair's coefficient goes in the flattened n x n matrix [m, m']
        self.register_buffer(
            "offdiag", torch.tensor([m * n + k for m, k in self.pairs], dtype=torch.long), persistent=False
        )
        # M - I = C z: C[m n + m', p] = beta for a_{m,m'}, -gamma for b_{m,m'}; C[m n + m, P + p] += gamma
        z_to_m = torch.zeros(n * n, 2 * num_pairs, dtype=torch.float64)  # beta, gamma unrounded until cast
        for p, (m, k) in enumerate(self.pairs):
            z_to_m[m * n + k, p] = beta
            z_to_m[m * n + k, num_pairs + p] = -gamma
            z_to_m[m * n + m, num_pairs + p] = gamma
        self.register_buffer("z_to_m", z_to_m, persistent=False)

    def combined_weight(self) -> torch.Tensor:
        """(n^2, n d): W_concat folded with the equation's constant map from z to M - I.

        The equation is ``h~_m = sum_k M[m, k] h_k`` with ``M = I + C z`` for a constant (n^2, 2P) matrix C
        (``M[m, m'] = beta a_{m,m'} - gamma b_{m,m'}``, ``M[m, m] = 1 + gamma sum_{m'} b_{m,m'}``), so
        ``M - I = (C W_concat) x`` for x what W_concat reads: one small matmul a layer and step, differentiable.
        """
        return self.z_to_m.to(self.W_concat.weight.dtype) @ self.W_concat.weight

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, B, T, d) layer outputs, (B, T) attention mask -> (n, B, T, d) refined outputs.

        Computed in the integrator's dtype (float32), returned in ``h``'s dtype. Fused: the coefficients
        ``M - I`` come from one batched matmul of the states (as they lie, no concatenation) with the
        combined weights (:meth:`combined_weight`), the layer norm folded in from per-token statistics;
        the weighted sums are one ``addcmul`` and n - 1 in-place ``addcmul_``; ``torch.compile``d on CUDA
        (``compile``). The
        same maths as :meth:`forward_reference` (the unfused original, kept for the tests).
        """
        if self.W_concat is None:
            return h
        hf = h.to(self.W_concat.weight.dtype)
        reads = hf if self.mode == "token" else pooled_states(hf, attention_mask, self.kind)
        step = integrate_compiled if self.use_compile(h) else integrate
        return step(hf, reads, self.combined_weight(), self.normalize == "layernorm").to(h.dtype)

    def use_compile(self, h: torch.Tensor) -> bool:
        """Whether this call runs the ``torch.compile``d step: ``compile`` True, or ``"auto"`` and h on CUDA."""
        return self.compile is True or (self.compile == "auto" and h.is_cuda)

    def forward_reference(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The unfused computation, as the equations read (concatenate, normalise, W_concat, build M, sum):
        the reference :meth:`forward` is tested against."""
        if self.W_concat is None:
            return h
        n, B, T, d = h.shape
        hf = h.to(self.W_concat.weight.dtype)
        if self.mode == "pooled":  # [h_1; ...; h_n] at the pooled token (the same position in every stream)
            h_cat = torch.cat([pool(hf[m], attention_mask, self.kind) for m in range(n)], dim=-1).unsqueeze(1)
        else:  # [h_1; ...; h_n] per token
            h_cat = hf.permute(1, 2, 0, 3).reshape(B, T, n * d)
        if self.normalize == "layernorm":
            h_cat = F.layer_norm(h_cat, (n * d,)) / math.sqrt(n * d)
        z = self.W_concat(h_cat)  # (B, T or 1, 2P)
        a, b = z.chunk(2, dim=-1)
        # h~_m = sum_k M[m, k] h_k with M[m, m'] = beta a_{m,m'} - gamma b_{m,m'} (m' != m)
        #                               M[m, m]  = 1 + gamma sum_{m'} b_{m,m'}
        M = z.new_zeros(*a.shape[:-1], n * n).index_copy(-1, self.offdiag, self.beta * a - self.gamma * b)
        M = M.view(*a.shape[:-1], n, n) + torch.diag_embed(1 + self.gamma * b.view(*b.shape[:-1], n, n - 1).sum(-1))
        M = M.permute(2, 3, 0, 1).unsqueeze(-1)  # (n, n, B, T or 1, 1): [m, k]
        refined = reduce(torch.add, (M[:, k] * hf[k] for k in range(n)))  # over the n streams k, vectorised over m
        return refined.to(h.dtype)


LAYER_NORM_EPS = 1e-5  # F.layer_norm's default, as forward_reference uses it


def pooled_states(h: torch.Tensor, attention_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """(n, B, T, d) states -> (n, B, 1, d): every stream's pooled token (:func:`~recsys.models.head.pool`)."""
    if kind == "encoder":
        return h[:, :, :1]
    last = attention_mask.long().sum(dim=1).clamp(min=1) - 1  # right padding
    return h[:, torch.arange(h.size(1), device=h.device), last].unsqueeze(2)


def integrate(h: torch.Tensor, reads: torch.Tensor, weight: torch.Tensor, layernorm: bool) -> torch.Tensor:
    """One integrator step, fused: ``h~_m = h_m + sum_k (M - I)[m, k] h_k``.

    Args:
        h: (n, B, T, d) float states.
        reads: what W_concat reads, unnormalised: ``h`` (mode token) or (n, B, 1, d) pooled states.
        weight: (n^2, n d) combined weights (:meth:`Integrator.combined_weight`).
        layernorm: W_concat reads ``LN(h_cat) / sqrt(n d)``; folded in as
            ``W LN(x) / s = (W x - mean(x) W 1) * rstd(x) / s``, from per-token statistics, so the
            normalised concatenation is never built.
    Returns:
        (n, B, T, d).
    """
    n, B, Tr, d = reads.shape
    w = weight.view(n * n, n, d).transpose(0, 1)  # (n, n^2, d): stream k's block
    if layernorm:  # one more row: the mean over the n d concatenated values, from the same matmul
        w = torch.cat([w, w.new_full((n, 1, d), 1.0 / (n * d))], dim=1)
    # (B Tr, n^2 [+ 1]) = W [h_1; ...; h_n], summed over the streams' blocks: no concatenation
    coef = torch.bmm(reads.reshape(n, B * Tr, d), w.contiguous().transpose(1, 2)).sum(0)
    if layernorm:
        stat = torch.promote_types(reads.dtype, torch.float32)  # bf16 states: statistics in float32
        coef, mean = coef[:, :-1], coef[:, -1:].to(stat)
        # var = E[x^2] - mean^2 (at least float32), E[x^2] from each stream's norm (a contiguous reduction;
        # torch.var_mean over the n and d dims is ~10x slower on the CPU). Exact up to rounding; it loses
        # precision only where |mean| >> std over a token's n d values, which hidden states do not show.
        sq = torch.linalg.vector_norm(reads, dim=-1, dtype=stat).square().mean(0).reshape(-1, 1) / d
        scale = (torch.rsqrt(sq - mean.square() + LAYER_NORM_EPS) / math.sqrt(n * d)).to(coef.dtype)
        coef = (coef - mean.to(coef.dtype) * weight.sum(-1)) * scale
    coef = coef.t().reshape(n, n, B, Tr, 1)  # (M - I)[m, k] per token (or per sequence: broadcast over T)
    streams, coefs = h.unbind(0), coef.unbind(1)  # unbind: one gradient copy in backward, not n zero-filled ones
    refined = torch.addcmul(h, coefs[0], streams[0])  # h_m + (M - I)[m, 0] h_0, all m at once
    for k in range(1, n):  # over the n streams, in place (addcmul_'s backward needs only coef and h)
        refined.addcmul_(coefs[k], streams[k])
    return refined


def _compiled(fn):
    """``torch.compile(fn)`` on first use (compiling costs seconds: only where a call asks for it)."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args)

    return call


integrate_compiled = _compiled(integrate)


class XCrossModel(nn.Module):
    """X-Cross over a peft ``PeftModel`` holding the frozen backbone and n source LoRA adapters.

    The backbone and every adapter are frozen here (``requires_grad=False``; note that peft's
    ``set_adapter`` makes the adapter it activates trainable again) and kept in eval mode whatever
    ``.train()`` says: the frozen model's dropout and the adapters' LoRA dropout stay off, so that
    with zero integrators X-Cross is exactly the n source models. Trainable: one
    :class:`Integrator` per transformer layer, ``w`` (n,) and the :class:`ScoringHead`.

    The n streams are rows ``m*N .. m*N+N-1`` (stream m) of one batch of n*N rows; each peft LoRA
    layer adds adapter m's update to block m only. ``state_dict()`` includes the frozen backbone;
    :meth:`trainable_state_dict` is what a checkpoint needs.

    Args:
        peft_model: a ``PeftModel`` with the source adapters loaded (any extra adapters are ignored).
        adapter_names: the n source adapters, in stream order.
        kind: ``"encoder"`` (pooled token: first) | ``"decoder"`` (pooled token: last non-pad).
        beta, gamma, mode, init, normalize: passed to every :class:`Integrator`.
        compile_integrators: ``"auto"`` (on CUDA) | ``True`` | ``False``: ``torch.compile`` the integrators'
            fused step (every :class:`Integrator`'s ``compile``).
        w_init: initial w, n values; ``None`` -> 1/n each **[ours]**.
        head_state: a ``ScoringHead`` state dict to start the head from (e.g. the target LoRA's head).
        head_dropout: the head's dropout.
        routing: how each stream gets its own adapter **[ours]**: ``"slice"`` (default; every LoRA
            layer runs its frozen base on all rows, then adds adapter m's update to row block m as
            a slice) | ``"peft"`` (peft's mixed-adapter batch, which gathers each adapter's rows; the
            fallback for adapters that are not plain LoRA ``Linear`` layers). Both are exact.
        combine: decoders with a final norm after the last layer **[ours]**:
            ``"after_norm"`` (default): ``h_final = sum_m w_m norm(h~_m)`` -- each stream goes
            through the model's final norm as its own source model would, so with a one-hot w
            X-Cross is exactly that source model's final hidden state;
            ``"before_norm"``: ``h_final = norm(sum_m w_m h~_m)``.
            For a model without a final norm (BERT) both are the same.
    """

    def __init__(
        self,
        peft_model: nn.Module,
        adapter_names: Sequence[str],
        kind: str,
        *,
        beta: float = 1.0,
        gamma: float = 1.0,
        mode: str = "token",
        init: str = "zero",
        w_init: Sequence[float] | None = None,
        head_state: dict | None = None,
        head_dropout: float = 0.0,
        combine: str = "after_norm",
        routing: str = "slice",
        normalize: str = "layernorm",
        compile_integrators: bool | str = "auto",
    ):
        super().__init__()
        for key, value, allowed in (("routing", routing, ("slice", "peft")), ("kind", kind, ("encoder", "decoder")),
                                    ("combine", combine, ("after_norm", "before_norm"))):
            if value not in allowed:
                raise ValueError(f"{key} must be {' or '.join(map(repr, allowed))}, got {value!r}")
        self.adapter_names = list(adapter_names)
        missing = set(self.adapter_names) - set(getattr(peft_model, "peft_config", {}))
        if not self.adapter_names or missing:
            raise ValueError(f"adapters {sorted(missing) or '[]'} are not loaded in the peft model")
        self.n, self.kind, self.combine = len(self.adapter_names), kind, combine

        self.backbone = peft_model
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        d = unwrap_peft(peft_model).config.hidden_size
        self.hidden_size = d
        self._layers = [transformer_layers(peft_model)]  # a list: not a second registration of the layers
        self._body = [body(peft_model)]
        norm = next((getattr(self._body[0], a) for a in FINAL_NORM_NAMES if hasattr(self._body[0], a)), None)
        self._final_norm = [norm if isinstance(norm, nn.Module) else None]
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self._peft_layers = [m for m in peft_model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
        self.routing = routing
        if routing == "slice" and not all(_sliceable(m, self.adapter_names) for m in self._peft_layers):
            self.routing = "peft"  # an adapter type the slice path does not know: peft's own routing

        self.integrators = nn.ModuleList(
            Integrator(self.n, d, beta=beta, gamma=gamma, mode=mode, init=init, kind=kind, normalize=normalize,
                       compile=compile_integrators)
            for _ in range(len(self._layers[0]))
        )
        self._effect: list | None = None  # [sum of ratios, tokens] while measuring (measure_effect)
        w0 = torch.full((self.n,), 1.0 / self.n) if w_init is None else torch.as_tensor(w_init, dtype=torch.float)
        if w0.shape != (self.n,):
            raise ValueError(f"w_init must have {self.n} values, got {tuple(w0.shape)}")
        self.w = nn.Parameter(w0.clone())
        self.head = ScoringHead(d, dropout=head_dropout)
        if head_state is not None:
            self.head.load_state_dict(head_state)

    # ---------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "XCrossModel":
        """Integrators, w and head follow ``mode``; the frozen backbone and adapters stay in eval."""
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The integrators' W_concat, w and the head: everything X-Cross trains."""
        return [*self.integrators.parameters(), self.w, *self.head.parameters()]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The state of the trainable parts only (for small checkpoints): ``integrators.*``, ``w``, ``head.*``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def w_concat_abs(self) -> float:
        """The mean absolute W_concat entry over every layer (0 at the zero initialisation)."""
        ws = [i.W_concat.weight.detach() for i in self.integrators if i.W_concat is not None]
        return float(torch.cat([w.abs().flatten() for w in ws]).mean()) if ws else 0.0

    def measure_effect(self, on: bool) -> float | None:
        """Start (``on``) or stop measuring how much the integrators act; stopping returns the mean over
        layers, streams and real tokens of ||h~_m - h_m|| / ||h_m|| (the integrated hidden state
        against the stream's own) since the start, None if nothing ran."""
        if on:
            self._effect = [0.0, 0.0]  # sums stay on the states' device until the stop: no sync a layer
            return None
        total, count = self._effect or (None, None)
        self._effect = None
        return float(total) / float(count) if count else None

    def _record_effect(self, h: torch.Tensor, refined: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Add one layer's ||h~_m - h_m|| / ||h_m|| over the real tokens of (n, B, T, d) states."""
        with torch.no_grad():
            h, refined = h.float(), refined.float()
            ratio = (refined - h).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)  # (n, B, T)
            mask = attention_mask.bool().unsqueeze(0).expand_as(ratio)
            self._effect[0] = self._effect[0] + ratio[mask].double().sum()
            self._effect[1] = self._effect[1] + mask.sum()

    @staticmethod
    def integrator_param_count(n: int, d: int, num_layers: int) -> int:
        """W_concat weights over all layers: L * (n d) * 2n(n-1)  (8d a layer for n = 2)."""
        return num_layers * n * d * 2 * n * (n - 1)

    @staticmethod
    def lora_param_count(shapes: Sequence[tuple[int, int]], r: int, num_layers: int) -> int:
        """LoRA weights over all layers: L * sum over target modules (d_in, d_out) of r (d_in + d_out).

        q and v of a d x d attention with r = 8: 4rd = 32d a layer.
        """
        return num_layers * sum(r * (d_in + d_out) for d_in, d_out in shapes)

    # ---------------------------------------------------------------------------------------
    @contextmanager
    def _integration_hooks(self, attention_mask: torch.Tensor, rows: list[str]):
        """Hooks that exist only inside the block, removed on exit even after an error.

        - on every peft LoRA layer, ``routing="slice"``: its adapters disabled (the base layer on
          all rows), and a hook adding adapter m's low-rank update to row block m;
          ``routing="peft"``: route row i through adapter ``rows[i]`` (peft's mixed-adapter batch,
          ``LoraLayer._mixed_batch_forward``, which gathers and scatters each adapter's rows);
          both differentiable with respect to the input;
        - on every transformer layer: the integrator, on the layer's output;
        - ``combine="before_norm"``: on the final norm, the w-combination of the streams.

        (peft's own ``PeftModel._enable_peft_forward_hooks(adapter_names=...)`` does the first, but it
        leaves its hooks in place when the forward raises, and refuses in training mode.)
        """
        n = self.n

        def refine(integrator):
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                if not torch.is_tensor(hidden):
                    raise TypeError(f"unexpected layer output {type(output).__name__}: want a tensor or a tuple")
                nB, T, d = hidden.shape
                h = hidden.view(n, nB // n, T, d)
                refined = integrator(h, attention_mask)
                if self._effect is not None:
                    self._record_effect(h, refined, attention_mask)
                refined = refined.reshape(nB, T, d)
                return (refined, *output[1:]) if isinstance(output, tuple) else refined

            return hook

        def combine_before_norm(module, args):
            hidden = args[0]
            nB, T, d = hidden.shape
            h = hidden.view(n, nB // n, T, d)
            combined = torch.einsum("m,mbtd->btd", self.w.to(h.dtype), h)
            return (combined, *args[1:])

        with ExitStack() as stack:
            if self.routing == "slice":  # rows are stream-major blocks: adapter m on block m
                add = partial(_add_block_updates, adapter_names=self.adapter_names)
                for module in self._peft_layers:
                    stack.callback(setattr, module, "_disable_adapters", module._disable_adapters)
                    module._disable_adapters = True
                    stack.callback(module.register_forward_hook(add).remove)
            else:
                route = partial(_route_rows, adapter_names=rows)
                for module in self._peft_layers:
                    stack.callback(module.register_forward_pre_hook(route, with_kwargs=True).remove)
            for layer, integrator in zip(self._layers[0], self.integrators):
                stack.callback(layer.register_forward_hook(refine(integrator)).remove)
            if self.combine == "before_norm" and self._final_norm[0] is not None:
                stack.callback(self._final_norm[0].register_forward_pre_hook(combine_before_norm).remove)
            yield

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, T) right-padded inputs -> (N, d) pooled ``h_final`` (float32)."""
        n, B = self.n, input_ids.size(0)
        kwargs = {"input_ids": input_ids.repeat(n, 1), "attention_mask": attention_mask.repeat(n, 1)}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids.repeat(n, 1)
        if self.kind == "decoder":
            kwargs["use_cache"] = False
        rows = [name for name in self.adapter_names for _ in range(B)]  # stream-major blocks
        with self._integration_hooks(attention_mask, rows):
            hidden = self._body[0](**kwargs).last_hidden_state
        if self.combine == "before_norm" and self._final_norm[0] is not None:  # combined already
            return pool(hidden, attention_mask, self.kind).float()
        pooled = pool(hidden, kwargs["attention_mask"], self.kind).float().view(n, B, -1)  # pool then combine: same
        return torch.einsum("m,mbd->bd", self.w, pooled)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, T) right-padded (history, candidate) inputs -> (N,) scores."""
        return self.head(self.encode(input_ids, attention_mask, token_type_ids))
