"""Tracing at block granularity and running the split stage by stage in one process."""

from __future__ import annotations

import pytest
import torch

from asyncdiff.models.sd import build_sd15
from asyncdiff.partition.auto import auto_plan, block_values
from asyncdiff.partition.blocks import BlockPolicy
from asyncdiff.partition.plan import Plan
from asyncdiff.partition.profile import profile_blocks
from asyncdiff.partition.split import split_graph
from asyncdiff.partition.diagnose import TraceError
from asyncdiff.partition.specs import meta_copy
from asyncdiff.partition.trace import trace_denoiser
from asyncdiff.partition.verify import run_split
from toys import TopLevelBranchy, ToyDenoiser, WithBranchy


@pytest.fixture(scope="module")
def unet():
    return build_sd15("tiny", seed=0).unet


@pytest.fixture(scope="module")
def unet_call():
    torch.manual_seed(1)
    return (torch.randn(2, 4, 8, 8), torch.tensor(981), torch.randn(2, 77, 32)), {"return_dict": False}


def run_stages(split, module, tensors):
    """Run the segments in program order in one process; check transfer specs on the way."""
    values, leaves = {}, ()
    specs = {t.value: t.spec for t in split.transfers}
    for seg in split.segments:
        outputs, seg_leaves = seg.module(module)(*tensors, *[values[v] for v in seg.inputs])
        assert len(outputs) == len(seg.outputs)
        for name, value in zip(seg.outputs, outputs):
            assert name not in specs or specs[name].shape == tuple(value.shape)
            values[name] = value
        if seg.index == split.output_segment:
            leaves = seg_leaves
    return leaves


@pytest.mark.parametrize("policy, n_blocks", [("coarse", 13), ("fine", 48)])
def test_trace_reproduces_unet_exactly(unet, unet_call, policy, n_blocks):
    args, kwargs = unet_call
    traced = trace_denoiser(unet, args, kwargs, policy=policy)
    assert len(traced.blocks) == n_blocks
    assert traced.blocks[0] == "conv_in" and traced.blocks[-1] == "conv_out"
    # timestep-only work is replicated, never partitioned
    assert all(b.startswith(("time_proj", "time_embedding")) for b in traced.replicated)
    with torch.no_grad():
        expected = unet(*args, **kwargs)[0]
        got = traced.unflatten_output(list(traced.graph_module(unet)(*traced.flatten_call(args, kwargs))))[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_skip_connections_are_block_edges(unet, unet_call):
    args, kwargs = unet_call
    traced = trace_denoiser(unet, args, kwargs)
    conv_in = [v for v in block_values(traced) if v.producer == 0]
    # conv_in feeds the first resnet and, through torch.cat, the last up block's last resnet
    assert [[traced.blocks[c] for c in v.consumers] for v in conv_in] == [["down_blocks.0.resnets.0",
                                                                         "up_blocks.3.resnets.2"]]


@pytest.mark.parametrize("model_n", [2, 3, 4])
def test_split_runs_stage_by_stage_exactly(unet, unet_call, model_n):
    args, kwargs = unet_call
    traced = trace_denoiser(unet, args, kwargs)
    costs = profile_blocks(traced, unet, args, kwargs, measure_time=False)
    plan = auto_plan(traced, costs, model_n, cost="flops", layouts=("contiguous",))
    split = split_graph(traced, plan)
    # every block in exactly one stage, in program order
    assert [b for stage in plan.stages for b in stage] == list(traced.blocks)
    assert all(t.src < t.dst for t in split.transfers)
    assert split.output_stage == model_n - 1 and len(split.segments) == model_n
    with torch.no_grad():
        expected = unet(*args, **kwargs)[0]
        leaves = run_stages(split, unet, traced.flatten_call(args, kwargs))
    torch.testing.assert_close(leaves[0], expected, rtol=0, atol=0)
    assert "recv" in split.describe()


@pytest.mark.parametrize("model_n", [2, 3])
def test_wrapped_plan_keeps_long_skips_local_and_is_exact(unet, unet_call, model_n):
    args, kwargs = unet_call
    traced = trace_denoiser(unet, args, kwargs)
    costs = profile_blocks(traced, unet, args, kwargs, measure_time=False)
    plan = auto_plan(traced, costs, model_n, cost="flops", bandwidth=1e-3, layouts=("wrapped",))
    split = split_graph(traced, plan)
    assert plan.stage_of("conv_in") == plan.stage_of("conv_out") == 0
    assert [s.stage for s in split.segments] == [0, *range(1, model_n), 0]
    assert split.output_stage == 0
    # conv_in's output reaches the last up block without leaving stage 0
    assert "denoiser_conv_in" not in {t.value for t in split.transfers}
    with torch.no_grad():
        expected = unet(*args, **kwargs)[0]
        leaves = run_stages(split, unet, traced.flatten_call(args, kwargs))
    torch.testing.assert_close(leaves[0], expected, rtol=0, atol=0)


def test_plain_user_module_and_dict_output():
    torch.manual_seed(0)
    toy = ToyDenoiser()
    args = (torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]))
    traced = trace_denoiser(toy, args, {})
    assert traced.blocks == ("conv_in", "body.0", "body.1", "body.2", "body.3", "conv_out")
    assert traced.replicated == ("embed",)
    split = split_graph(traced, Plan(stages=(("conv_in", "body.0", "body.1"), ("body.2", "body.3", "conv_out"))))
    # the skip connection travels once, with the main path
    assert sorted(t.value for t in split.transfers) == ["denoiser_body_1", "denoiser_conv_in"] or \
        len(split.transfers) == 2
    with torch.no_grad():
        leaves = run_stages(split, toy, traced.flatten_call(args, {}))
        torch.testing.assert_close(traced.unflatten_output(list(leaves))["sample"], toy(*args)["sample"],
                                   rtol=0, atol=0)


def test_untraceable_module_names_module_and_policy():
    module = meta_copy(WithBranchy())  # weight-free: only the meta trace can run (Note [value trace])
    with pytest.raises(TraceError, match=r"inside block\.branchy \(Branchy\).*policy='coarse'"):
        trace_denoiser(module, (torch.randn(2, 4),), {}, policy="fine")
    with pytest.raises(TraceError, match=r"'block.branchy' cannot run on meta tensors.*depends on tensor values"):
        trace_denoiser(module, (torch.randn(2, 4),), {}, policy="coarse")


def test_policy_predicate_and_bad_policy():
    toy = ToyDenoiser()
    policy = BlockPolicy(predicate=lambda name, m: name == "body")
    assert "body" not in policy.blocks(toy)  # containers are transparent: their children are blocks
    with pytest.raises(ValueError, match="block policy 'medium' is unknown"):
        BlockPolicy.parse("medium")


def test_latent_must_be_a_tensor_argument():
    toy = ToyDenoiser()
    with pytest.raises(ValueError, match="latent='x' is not a tensor argument"):
        trace_denoiser(toy, (torch.randn(1, 4, 8, 8), torch.tensor([1.0])), {}, latent="x")


class _ShapeCode(torch.nn.Module):
    """Top-level code as current diffusers models write it (issue 11): ``x.size(0)``, iteration
    over a tensor and over a tuple of chunks, ``zip`` of modules with chunks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])
        self.c = torch.nn.Linear(8, 8)

    def forward(self, sample: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor]:
        batch = sample.size(0)
        h = self.a(sample.view(batch, -1, 8))
        h = h + cond.repeat(h.size(0), 1, 1)
        parts = [f(p) for f, p in zip(self.b, h.chunk(2, dim=1))]
        out = torch.cat([x * w for x, w in zip(parts, (1.0, 2.0))], dim=1)
        return (self.c(torch.stack([row for row in out])),)


def test_shape_arithmetic_and_iteration_trace_exactly():
    model, args = _ShapeCode(), (torch.randn(3, 4, 8), torch.randn(1, 4, 8))
    traced = trace_denoiser(model, args, {})
    assert traced.blocks == ("a", "b.0", "b.1", "c")
    with torch.no_grad():
        got = traced.unflatten_output(list(traced.graph_module(model)(*traced.flatten_call(args, {}))))[0]
        torch.testing.assert_close(got, model(*args)[0], rtol=0, atol=0)


class _UpdatesAndConstants(torch.nn.Module):
    """Issue 11's in-place code: item assignment on the latent stream (read afterwards through an
    alias, as eager code sees it), ``.data[...].copy_`` on a block's output, and tensor constants
    built from Python values (position ids filled by item assignment, ``torch.tensor([0] * batch)``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor]:
        h = self.a(sample)
        skip = h
        ids = torch.zeros(sample.shape[0], 8)
        ids[:, 1] = ids[:, 1] + torch.arange(sample.shape[0])
        h[:, 1:] = h[:, 1:] * 2
        g = self.b(h + ids)
        g.data[:, :2].copy_(g[:, 2:4])
        return (self.c(g) + skip + torch.tensor([0] * sample.shape[0])[:, None],)


@pytest.mark.parametrize("stages", [(("a",), ("b", "c")), (("a", "b"), ("c",)), (("a",), ("b",), ("c",))],
                         ids=["a|bc", "ab|c", "a|b|c"])
def test_item_assignment_data_copies_and_constants_split_exactly(stages):
    model, args = _UpdatesAndConstants(), (torch.randn(4, 8),)
    traced = trace_denoiser(model, args, {})
    assert traced.blocks == ("a", "b", "c") and len(traced.constants) == 2
    with torch.no_grad():
        want = model(*args)[0]
        got = run_split(split_graph(traced, Plan(stages=stages)), model, traced.flatten_call(args, {}))
    torch.testing.assert_close(traced.unflatten_output(list(got))[0], want, rtol=0, atol=0)


class _CachedRope:
    """A plain object caching a table per device, as Z-Image's rotary embedder does."""

    def __init__(self) -> None:
        self.freqs = [torch.randn(8, generator=torch.Generator().manual_seed(1))]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.freqs[0].device != ids.device:
            self.freqs = [f.to(ids.device) for f in self.freqs]
        return ids * self.freqs[0]


class _AsksDevice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.rope = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), _CachedRope()

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor]:
        if sample.device.type == "mps":
            sample = sample * 2
        h = self.rope(self.a(sample))
        return (self.b(h + torch.ones(1, device=sample.device)),)


def test_device_questions_are_answered_from_the_call():
    """``x.device.type == ...`` and ``t.device != x.device`` specialise like shapes (issue 11)."""
    model, args = _AsksDevice(), (torch.randn(4, 8),)
    traced = trace_denoiser(model, args, {})
    assert traced.blocks == ("a", "b")
    with torch.no_grad():
        got = run_split(split_graph(traced, Plan(stages=(("a",), ("b",)))), model, traced.flatten_call(args, {}))
        torch.testing.assert_close(traced.unflatten_output(list(got))[0], model(*args)[0], rtol=0, atol=0)


def test_value_trace_follows_a_branch_on_values_and_checks_it_every_call():
    """Note [value trace]: with its weights present, a denoiser that branches on a tensor's value
    traces with the call's real values; the branch it took is checked at run time."""
    torch.manual_seed(0)
    model, x = TopLevelBranchy(), torch.randn(2, 4)
    with torch.no_grad():
        taken = bool(model.a(x).mean() > 0)
        other = next(y for y in (x * -3, x * 3, x + 5, x - 5) if bool(model.a(y).mean() > 0) != taken)
        traced = trace_denoiser(model, (x,), {})
        assert traced.by_values and traced.guards == 1 and traced.blocks == ("a", "b")
        split = split_graph(traced, Plan(stages=(("a",), ("b",))))
        got = run_split(split, model, traced.flatten_call((x,), {}))
        torch.testing.assert_close(got[0], model(x), rtol=0, atol=0)
        with pytest.raises(RuntimeError, match=r"control flow depends on a tensor value \(a branch on a tensor: "
                                               rf"traced as {taken}, now {not taken}\)"):
            run_split(split, model, traced.flatten_call((other,), {}))


class _SharedFeedForward(torch.nn.Module):
    """A block whose feed-forward runs on two token groups, as CogView4's does."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.ff = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ff(self.norm(x)), self.ff(c)


class _CallsTwice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList([_SharedFeedForward(), _SharedFeedForward()])

    def forward(self, sample: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor]:
        h = self.a(sample)
        for block in self.blocks:
            h, context = block(h, context)
        return (self.out(h + context.mean()),)


def test_a_module_called_twice_merges_into_its_block():
    """Note [merged blocks]: the feed-forward called twice makes its enclosing block one unit."""
    model, args = _CallsTwice(), (torch.randn(2, 3, 8), torch.randn(2, 5, 8))
    traced = trace_denoiser(model, args, {}, policy="fine")
    assert traced.merged == ("blocks.0", "blocks.1")
    assert traced.blocks == ("a", "blocks.0", "blocks.1", "out")
    assert traced.notes()[0] == "blocks.0 is one block: a module inside it is called more than once"
    with torch.no_grad():
        got = run_split(split_graph(traced, Plan(stages=(("a", "blocks.0"), ("blocks.1", "out")))), model,
                        traced.flatten_call(args, {}))
        torch.testing.assert_close(traced.unflatten_output(list(got))[0], model(*args)[0], rtol=0, atol=0)



def test_a_trace_failure_has_a_stable_reason():
    """Issue 25: the cause is told by the exception's type (our proxies raise ``ValueRead``; fx's
    ``create_arg``, ``to_bool`` and ``iter`` by where they raise), not by its text, and kept as
    ``TraceError.reason``."""
    from toys import ReadsAFloat

    module = ReadsAFloat()
    skeleton = meta_copy(module, {})  # weights on meta: the meta trace, no value trace to fall back on
    with pytest.raises(TraceError) as caught:
        trace_denoiser(module, (torch.randn(2, 4),), {}, latent="sample", skeleton=skeleton)
    assert caught.value.reason == "reads-a-number", caught.value
    assert "reads a tensor's value as a Python number" in str(caught.value)
