"""parallel.py — 4D parallelism applied from outside to model.py's plain model.

    1. the process grid          dp x pp x cp x tp ranks, tp innermost, and their groups
    2. Megatron's f and g        the four communication steps of tensor/sequence parallelism
    3. tensor + sequence parallel  surgery: column/row-parallel linears, norms that enter the
                                 tp region, vocab-parallel embedding, head and cross-entropy
    4. context parallel          ring attention over load-balanced chunks
    5. pipeline parallel         stages, point-to-point, AFAB and 1F1B schedules
    6. data parallel             bucketed all-reduce from backward hooks; ZeRO-1, 2 and 3
    7. the training step         gradient accumulation, one pipeline schedule, gradient norm
    8. names and pieces          what part of each whole tensor a rank holds

Every technique keeps the names of model.py's parameters, so a checkpoint saved under one
layout loads under any other. PARALLEL_VERBOSE=1 prints every pipeline transfer and bucket launch.
"""
import contextlib
import math
import os
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fused
from model import MoE, document_starts

VERBOSE = os.environ.get("PARALLEL_VERBOSE") == "1"  # print pipeline transfers and bucket launches


def init_distributed():
    """(rank, world_size, local_rank) from torchrun's environment; joins the process group
    when there is more than one process (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local_rank


# ----------------------------------------------------------------------------------------
# 1. The process grid

@dataclass
class Grid:
    """Where this rank sits in the dp x pp x cp x tp grid, and the groups it talks in.
    A group of one rank is None: every collective below is then skipped."""
    dp: int = 1
    pp: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1          # expert parallel: experts split over groups of ep consecutive dp ranks
    ep_rank: int = 0
    dp_rank: int = 0
    pp_rank: int = 0
    cp_rank: int = 0
    tp_rank: int = 0
    groups: dict = field(default_factory=dict)   # "tp", "cp", "pp", "dp", "dp_cp", "embed", "ep", "edp_cp" -> group
    ranks: dict = field(default_factory=dict)    # the same keys -> global ranks in the group
    sequence_parallel: bool = False
    tp_sharded: dict = field(default_factory=dict)  # parameter name -> dim it is split along over tp
    tp_partial: set = field(default_factory=set)    # replicated parameters whose grads are partial sums
    ep_sharded: set = field(default_factory=set)    # stacked experts, split along dim 0 over ep
    tied_head: bool = False                         # lm_head.weight is embed.weight

    @property
    def first(self):
        return self.pp_rank == 0

    @property
    def last(self):
        return self.pp_rank == self.pp - 1

    def peer(self, axis, delta):
        """Global rank delta steps along a ring axis ("pp" or "cp")."""
        ranks = self.ranks[axis]
        return ranks[(getattr(self, f"{axis}_rank") + delta) % len(ranks)]


def check_layout(p, model_cfg, data_cfg, world):
    """Resolve dp and raise ValueError naming what makes the layout impossible."""
    dp = p.dp or world // max(1, p.tp * p.pp * p.cp)
    if dp == 0 or dp * p.pp * p.cp * p.tp != world:
        raise ValueError(f"parallel.dp={p.dp or 'auto'} x parallel.pp={p.pp} x parallel.cp={p.cp} x "
                         f"parallel.tp={p.tp} does not match the world size of {world} processes")
    m = model_cfg
    checks = [
        (m.n_heads % p.tp == 0, f"model.n_heads={m.n_heads} is not divisible by parallel.tp={p.tp}"),
        (m.n_kv_heads % p.tp == 0, f"model.n_kv_heads={m.n_kv_heads} is not divisible by parallel.tp={p.tp}"),
        (m.padded_vocab % p.tp == 0, f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp}: set "
                                     f"model.vocab_multiple = {64 * p.tp} to pad it (padded ids are never predicted)"),
        (p.cp == 1 or not data_cfg.doc_mask, f"data.doc_mask with parallel.cp={p.cp}: ring attention does not "
                                             "mask documents; use cp = 1 with packed documents"),
        (m.n_layers >= p.pp, f"model.n_layers={m.n_layers} is fewer than parallel.pp={p.pp} stages"),
        (p.cp == 1 or data_cfg.seq_len % (2 * p.cp) == 0,
         f"data.seq_len={data_cfg.seq_len} is not divisible by 2 x parallel.cp={2 * p.cp} (two chunks per rank)"),
        (not p.sequence_parallel or (data_cfg.seq_len // p.cp) % p.tp == 0,
         f"data.seq_len / cp = {data_cfg.seq_len // p.cp} is not divisible by parallel.tp={p.tp} "
         "for sequence parallelism"),
        (p.pp == 1 or data_cfg.micro_batch % microbatches(p, data_cfg.micro_batch) == 0,
         f"data.micro_batch={data_cfg.micro_batch} is not divisible by parallel.microbatches={p.microbatches}"),
        ("M" not in m.block_pattern or p.tp == p.cp == 1, f"parallel.tp={p.tp}, parallel.cp={p.cp} with Mamba "
         "layers (model.block_pattern): their scan is not split over ranks; use tp = cp = 1 (dp and pp work)"),
        (p.ep == 1 or m.moe_experts, "parallel.ep > 1 needs a Mixture-of-Experts model (model.moe_experts)"),
        (dp % p.ep == 0, f"parallel.ep={p.ep} does not divide parallel.dp={dp}: expert-parallel ranks are "
                         "data-parallel ranks"),
        (m.moe_experts % p.ep == 0, f"model.moe_experts={m.moe_experts} is not divisible by parallel.ep={p.ep}"),
        (p.ep == 1 or not m.moe_capacity_factor, "parallel.ep > 1 runs the experts dropless: set "
                                                  "model.moe_capacity_factor = 0"),
        (p.ep == 1 or not p.zero, f"parallel.ep={p.ep} with parallel.zero={p.zero}: expert parameters are reduced "
                                  "over their own group, outside ZeRO's buckets; use parallel.zero = 0"),
        # ZeRO-3 gathers a block's parameters around each use; a pipeline would gather them
        # again for every micro-batch in flight (DeepSpeed does not combine the two either).
        (p.zero < 3 or p.pp == 1, f"parallel.zero=3 with parallel.pp={p.pp}: use parallel.zero = 1 or 2 with pp"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    return dp


def microbatches(p, micro_batch):
    """Pipeline micro-batches per micro-step: parallel.microbatches, or one per sequence."""
    return p.microbatches or micro_batch


def make_grid(p, model_cfg, data_cfg):
    """Build the grid (and its process groups, on every rank in the same order)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    dp = check_layout(p, model_cfg, data_cfg, world)
    grid = Grid(dp=dp, pp=p.pp, cp=p.cp, tp=p.tp, ep=p.ep, sequence_parallel=p.sequence_parallel and p.tp > 1)
    layout = torch.arange(world).view(dp, p.pp, p.cp, p.tp)  # tp innermost: neighbours share the fastest links
    grid.dp_rank, grid.pp_rank, grid.cp_rank, grid.tp_rank = (layout == rank).nonzero()[0].tolist()
    grid.ep_rank = grid.dp_rank % p.ep
    # dp split as (dp / ep) x ep: "ep" runs along consecutive dp ranks, "edp_cp" along the
    # ranks that hold the same experts (and the cp ranks), where expert gradients are summed.
    axes = [(layout, {"dp": (0,), "pp": (1,), "cp": (2,), "tp": (3,), "dp_cp": (0, 2)}),
            (layout.view(dp // p.ep, p.ep, p.pp, p.cp, p.tp), {"ep": (1,), "edp_cp": (0, 3)} if p.ep > 1 else {})]
    for ranks, names in axes:
        for name, dims in names.items():
            # Fix the other axes, run along these: each line of ranks is one group.
            rest = [d for d in range(ranks.dim()) if d not in dims]
            lines = ranks.permute(*rest, *dims).reshape(-1, math.prod(ranks.shape[d] for d in dims))
            for line in lines.tolist():
                group = dist.new_group(line) if dist.is_initialized() and len(line) > 1 else None
                if rank in line:
                    grid.groups[name], grid.ranks[name] = group, line
    # Checkpoint writers wait for each other from a background thread: on a gloo group of
    # their own, never in the way of the training collectives.
    grid.groups["ckpt"] = dist.new_group(backend="gloo") if dist.is_initialized() and world > 1 else None
    if p.pp > 1:  # first and last stage share a tied embedding's gradient
        for line in layout.permute(0, 2, 3, 1).reshape(-1, p.pp).tolist():
            pair = [line[0], line[-1]]
            group = dist.new_group(pair)
            if rank in pair:
                grid.groups["embed"], grid.ranks["embed"] = group, pair
    return grid


def _size(group):
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(x, group, op=dist.ReduceOp.SUM):
    if _size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


# ----------------------------------------------------------------------------------------
# 2. Megatron's conjugate communication steps (Shoeybi et al. 2019, fig. 3; Korthikanti
#    et al. 2022, fig. 5 for sequence parallelism). Each is identity on one pass and a
#    collective on the other, so a tensor-parallel block needs one collective each way.

class CopyToTP(torch.autograd.Function):
    """f: identity forward; all-reduce backward (each rank's input grad is a partial sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g.contiguous(), ctx.group), None


class ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward (sum the partial outputs); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


def _gather_seq(x, group):
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _reduce_scatter_seq(x, group):
    chunks = [c.contiguous() for c in x.chunk(_size(group), dim=1)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


class GatherSeq(torch.autograd.Function):
    """Sequence parallel's f: all-gather the sequence slices forward; reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_seq(g, ctx.group), None


class ReduceScatterSeq(torch.autograd.Function):
    """Sequence parallel's g: reduce-scatter forward (sum, keep my slice); all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather_seq(g, ctx.group), None


def enter_tp(x, grid):
    """Into a tensor-parallel region (before column-parallel linears)."""
    group = grid.groups.get("tp")
    if group is None:
        return x
    return GatherSeq.apply(x, group) if grid.sequence_parallel else CopyToTP.apply(x, group)


def exit_tp(x, grid):
    """Out of a tensor-parallel region (after row-parallel linears)."""
    group = grid.groups.get("tp")
    if group is None:
        return x
    return ReduceScatterSeq.apply(x, group) if grid.sequence_parallel else ReduceFromTP.apply(x, group)


# ----------------------------------------------------------------------------------------
# 3. Tensor + sequence parallelism: surgery on the plain model, module by module, keeping
#    model.py's parameter names. Column-parallel (output features split): q, k, v, gate, up,
#    the LM head and the embedding rows (vocab). Row-parallel (input features split, outputs
#    summed): o, down. Attention heads split with q/k/v; each rank attends with its own heads.
#    Where the communication happens, in each module's forward:
#      the norm before q/k/v (and before gate/up)  f: enter the tp region, once for all three
#      RowParallelLinear (o, down)                  g: sum the partial outputs
#      the embedding                                g: sum the rows' owners' vectors
#      the head                                     f, then the vocab-parallel loss

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def _shard(param, dim, grid):
    return nn.Parameter(param.detach().chunk(grid.tp, dim=dim)[grid.tp_rank].clone())


class NormIntoTP(nn.Module):
    """RMSNorm, then f (or sequence parallel's all-gather): the entry to a tensor-parallel
    region. q, k and v (gate and up) share this input, so one f serves all three, which is
    what Megatron gets by fusing them into one QKV linear."""

    def __init__(self, norm, grid):
        super().__init__()
        self.weight, self.eps, self.grid = norm.weight, norm.eps, grid

    def forward(self, x):
        return enter_tp(fused.rms_norm(x, self.weight, self.eps), self.grid)


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T with W's output rows split over tp: no communication, the
    input already entered the region (NormIntoTP)."""

    def __init__(self, linear, grid):
        super().__init__()
        self.weight = _shard(linear.weight, 0, grid)

    def forward(self, x):
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """W's input columns split over tp: each rank's product is a partial sum, and g adds them
    up (all-reduce, or reduce-scatter along the sequence under sequence parallelism)."""

    def __init__(self, linear, grid):
        super().__init__()
        self.weight, self.grid = _shard(linear.weight, 1, grid), grid

    def forward(self, x):
        return exit_tp(F.linear(x, self.weight), self.grid)


class VocabParallelEmbedding(nn.Module):
    """Each tp rank holds vocab_size / tp rows; a token's vector comes from the rank that
    owns its row, the others contribute zeros, and exit_tp sums (or reduce-scatters)."""

    def __init__(self, embed, grid):
        super().__init__()
        self.grid = grid
        self.weight = _shard(embed.weight, 0, grid)
        self.start = grid.tp_rank * self.weight.shape[0]

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        return exit_tp(h.masked_fill(outside[..., None], 0.0), self.grid)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary across tp ranks, without gathering them:
    all-reduce the row max, the sum of exponentials and the target logit (Megatron-LM)."""

    @staticmethod
    def forward(ctx, logits, targets, start, group, ignore_index, vocab, per_token=False):
        logits = logits.float()                                 # (N, V / tp)
        n_local = logits.shape[-1]
        if start + n_local > vocab:  # padded rows (model.vocab_multiple) never win the softmax
            logits[:, max(0, vocab - start):] = float("-inf")
        row_max = all_reduce(logits.max(-1).values, group, dist.ReduceOp.MAX)
        exp = (logits - row_max[:, None]).exp()
        sum_exp = all_reduce(exp.sum(-1), group)
        local_t = targets - start
        mine = (local_t >= 0) & (local_t < n_local) & (targets != ignore_index)
        local_t = local_t.clamp(0, n_local - 1)
        target_logit = all_reduce(logits.gather(1, local_t[:, None]).squeeze(1) * mine, group)
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)
        losses = (sum_exp.log() + row_max - target_logit) * valid
        ctx.save_for_backward(exp / sum_exp[:, None], local_t, mine, valid, n_valid)
        ctx.per_token = per_token
        return -losses if per_token else losses.sum() / n_valid  # per_token: log-probabilities

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, mine, valid, n_valid = ctx.saved_tensors
        grad = softmax  # in place, as Megatron does: this backward is the softmax's only reader
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= mine.float()
        grad *= (valid.float() * (-g if ctx.per_token else g / n_valid))[:, None]
        return grad, None, None, None, None, None, None


class VocabParallelLMHead(nn.Module):
    """The head's vocabulary rows split over tp (tied: the embedding's own shard). With
    targets, the vocab-parallel loss, so the (tokens, vocab) logits are never gathered;
    without (scoring, generation), the logits gathered whole, cut to the vocabulary."""

    def __init__(self, weight, grid, vocab):
        super().__init__()
        self.weight, self.grid, self.vocab = weight, grid, vocab

    def forward(self, h, targets=None, ignore_index=-100, per_token=False):
        logits = F.linear(enter_tp(h, self.grid), self.weight)    # (B, S, V / tp)
        group = self.grid.groups["tp"]
        if targets is None:
            parts = [torch.empty_like(logits) for _ in range(self.grid.tp)]
            dist.all_gather(parts, logits.contiguous(), group=group)
            return torch.cat(parts, dim=-1)[..., :self.vocab]       # (B, S, V)
        out = VocabParallelCrossEntropy.apply(logits.flatten(0, 1), targets.flatten(), self.grid.tp_rank *
                                              logits.shape[-1], group, ignore_index, self.vocab, per_token)
        return out.view(targets.shape) if per_token else out


def apply_tensor_parallel(model, grid):
    for i, block in enumerate(model.layers):
        for part in (block.attn, block.mlp):
            for name, child in list(part.named_children()):
                if name in COLUMN or name in ROW:
                    setattr(part, name, (ColumnParallelLinear if name in COLUMN else RowParallelLinear)(child, grid))
        block.attn_norm = NormIntoTP(block.attn_norm, grid)
        if isinstance(block.mlp, MoE):  # experts stay whole, outside the tp region (Megatron's expert tp = 1):
            # under sequence parallelism each rank routes its own slice of the sequence, else all of it
            if grid.sequence_parallel:
                grid.tp_partial |= {f"layers.{i}.{n}" for n, _ in block.named_parameters() if n.startswith("mlp")}
        else:
            block.mlp_norm = NormIntoTP(block.mlp_norm, grid)
        if hasattr(block.attn, "q_norm"):  # QK-norm sees only this rank's heads
            grid.tp_partial |= {f"layers.{i}.attn.q_norm.weight", f"layers.{i}.attn.k_norm.weight"}
        if grid.sequence_parallel:  # norms see only this rank's slice of the sequence
            grid.tp_partial |= {f"layers.{i}.attn_norm.weight", f"layers.{i}.mlp_norm.weight"}
    if grid.sequence_parallel:
        grid.tp_partial.add("norm.weight")
    tied = model.lm_head.weight is model.embed.weight
    model.embed = VocabParallelEmbedding(model.embed, grid)
    model.lm_head = VocabParallelLMHead(model.embed.weight if tied else _shard(model.lm_head.weight, 0, grid), grid,
                                        model.cfg.vocab_size)
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead)):
            grid.tp_sharded[f"{name}.weight"] = 1 if isinstance(module, RowParallelLinear) else 0


# ----------------------------------------------------------------------------------------
# 4. Context parallelism: ring attention (Liu et al. 2023) over load-balanced chunks.
#    The sequence is cut into 2*cp chunks and rank i keeps chunks i and 2*cp-1-i, so every
#    rank has the same share of the causal triangle (Llama 3 paper, section 3.3.2).
#    Keys and values travel around the ring; each rank merges the partial attention of its
#    queries over every block with the blocks' log-sum-exps.

def context_chunks(t, grid):
    """(B, S) -> (B, S / cp): this rank's two mirrored chunks, and their positions."""
    n = 2 * grid.cp
    chunks = t.chunk(n, dim=1)
    c = chunks[0].shape[1]
    mine = (grid.cp_rank, n - 1 - grid.cp_rank)
    pos = torch.cat([torch.arange(i * c, (i + 1) * c, device=t.device) for i in mine])
    return torch.cat([chunks[i] for i in mine], dim=1), pos


def _ring_pass(t, grid):
    """Send t to the next cp rank, receive the previous rank's; returns (buffer, requests)."""
    buf = torch.empty_like(t)
    ops = [dist.P2POp(dist.isend, t.contiguous(), grid.peer("cp", 1), grid.groups["cp"]),
           dist.P2POp(dist.irecv, buf, grid.peer("cp", -1), grid.groups["cp"])]
    return buf, dist.batch_isend_irecv(ops)


def _ring_blocks(grid, step, causal):
    """(q chunk slot, kv chunk slot, diagonal?) pairs to compute at this ring step: a query
    chunk attends a key chunk with a lower index fully, its own causally, a higher one never."""
    n = 2 * grid.cp
    src = (grid.cp_rank - step) % grid.cp
    q_ids, kv_ids = (grid.cp_rank, n - 1 - grid.cp_rank), (src, n - 1 - src)
    return [(i, j, causal and a == b) for i, a in enumerate(q_ids) for j, b in enumerate(kv_ids)
            if not causal or b <= a]


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, grid):
        c = q.shape[2] // 2
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        kv = torch.stack([k, v])
        for step in range(grid.cp):
            if step + 1 < grid.cp:  # overlap: the next block travels while this one is computed
                kv_next, reqs = _ring_pass(kv, grid)
            for i, j, diagonal in _ring_blocks(grid, step, causal):
                qs, ks = slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c)
                o, o_lse = fused.attention_with_lse(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], diagonal, scale)
                new = torch.logaddexp(lse[:, :, qs], o_lse)   # merge by log-sum-exp
                out[:, :, qs] = (out[:, :, qs] * (lse[:, :, qs] - new).exp()[..., None]
                                 + o * (o_lse - new).exp()[..., None])
                lse[:, :, qs] = new
            if step + 1 < grid.cp:
                for r in reqs:
                    r.wait()
                kv = kv_next
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal, ctx.grid = scale, causal, grid
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        grid, c = ctx.grid, q.shape[2] // 2
        dout = dout.float()
        delta = (dout * out).sum(-1)                                         # (B, H, S_local)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)   # travels with its block
        for step in range(grid.cp):
            if step + 1 < grid.cp:
                kv_next, reqs = _ring_pass(kv, grid)
            for i, j, diagonal in _ring_blocks(grid, step, ctx.causal):
                qs, ks = slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c)
                # FlashAttention-2's backward of one block, with the whole rows' lse and delta.
                dq_b, dk_b, dv_b = fused.attention_block_backward(
                    q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], dout[:, :, qs], lse[:, :, qs], delta[:, :, qs],
                    diagonal, ctx.scale)
                dq[:, :, qs] += dq_b
                dkv[0][:, :, ks] += dk_b
                dkv[1][:, :, ks] += dv_b
            # After cp passes every block's dK/dV accumulator is back on the rank that owns it.
            dkv_next, dreqs = _ring_pass(dkv, grid)
            for r in dreqs + (reqs if step + 1 < grid.cp else []):
                r.wait()
            dkv = dkv_next
            if step + 1 < grid.cp:
                kv = kv_next
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q, k, v, causal=True, scale=None, doc_starts=None, grid=None):
    """fused.attention's signature over the cp group; q, k, v hold this rank's two chunks.
    Packed documents are refused at start (check_layout): doc_starts is always None here."""
    return RingAttention.apply(q, k, v, scale or q.shape[-1] ** -0.5, causal, grid)


# ----------------------------------------------------------------------------------------
# 5. Pipeline parallelism: stage s keeps layers [L*s/pp, L*(s+1)/pp); the embedding lives
#    on the first stage, the final norm, head and loss on the last. Micro-batches flow
#    forward as activations and backward as their gradients, point to point.

def apply_pipeline(model, grid):
    n = len(model.layers)
    lo, hi = n * grid.pp_rank // grid.pp, n * (grid.pp_rank + 1) // grid.pp
    # A ModuleDict keyed by the global index keeps the names "layers.{i}...." of model.py.
    model.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(lo, hi)})
    if not grid.first:
        model.embed = None
    if not grid.last:
        model.norm, model.lm_head = None, None


def _p2p(sends=(), recvs=()):
    """Batched point-to-point: sends and receives posted together never deadlock."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    if ops:
        for r in dist.batch_isend_irecv(ops):
            r.wait()


class Pipe:
    """The four transfers of a stage, each a no-op where there is no neighbour."""

    def __init__(self, grid, shape, dtype, device):
        self.grid, self.shape, self.dtype, self.device = grid, shape, dtype, device
        self.prev, self.next = grid.peer("pp", -1), grid.peer("pp", 1)

    def _log(self, what):
        if VERBOSE:
            print(f"[pp {self.grid.pp_rank}] {what}", flush=True)

    def _empty(self):
        return torch.empty(self.shape, dtype=self.dtype, device=self.device, requires_grad=True)

    def recv_forward(self):
        if self.grid.first:
            return None
        x = self._empty()
        self._log(f"<- activation from stage {self.grid.pp_rank - 1}")
        _p2p(recvs=[(x.data, self.prev)])
        return x

    def send_forward(self, h):
        if not self.grid.last:
            self._log(f"-> activation to stage {self.grid.pp_rank + 1}")
            _p2p(sends=[(h.detach(), self.next)])

    def recv_backward(self):
        if self.grid.last:
            return None
        g = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self._log(f"<- gradient from stage {self.grid.pp_rank + 1}")
        _p2p(recvs=[(g, self.next)])
        return g

    def send_backward(self, g):
        if not self.grid.first:
            self._log(f"-> gradient to stage {self.grid.pp_rank - 1}")
            _p2p(sends=[(g, self.prev)])

    def send_forward_recv_backward(self, h):
        if self.grid.last:
            return None
        g = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self._log(f"-> activation to / <- gradient from stage {self.grid.pp_rank + 1}")
        _p2p(sends=[(h.detach(), self.next)], recvs=[(g, self.next)])
        return g

    def send_backward_recv_forward(self, g):
        if self.grid.first:
            return None
        x = self._empty()
        self._log(f"-> gradient to / <- activation from stage {self.grid.pp_rank - 1}")
        _p2p(sends=[(g, self.prev)], recvs=[(x.data, self.prev)])
        return x


def pipeline_schedule(model, grid, chunks, pos, scale, schedule, pipe, before_last_backward, autocast):
    """Run forward and backward of every micro-batch in chunks [(inputs, targets, document
    starts or None)] with the AFAB (GPipe) or 1F1B (PipeDream-Flush) order. Returns the
    summed loss (last stage)."""
    m, stash, losses = len(chunks), [], []

    def forward(i, x):
        with autocast:
            out = model(x if x is not None else chunks[i][0], chunks[i][1], pos, chunks[i][2])
        if grid.last:
            losses.append(out.detach().float())
        stash.append((x, out))
        return out

    def backward(i, grad):
        if i == m - 1:
            before_last_backward()
        x, out = stash.pop(0)
        torch.autograd.backward(out * scale if grid.last else out, None if grid.last else grad)
        return None if grid.first else x.grad

    if schedule == "afab":  # all forwards, then all backwards: simple, holds m activations
        for i in range(m):
            pipe.send_forward(forward(i, pipe.recv_forward()))
        for i in range(m):
            pipe.send_backward(backward(i, pipe.recv_backward()))
        return sum(losses)
    # 1F1B: warm-up forwards fill the pipeline, then each forward is followed by the oldest
    # backward, so a stage holds at most pp - stage activations instead of m.
    warmup = min(grid.pp - grid.pp_rank - 1, m)
    steady = m - warmup
    for i in range(warmup):
        pipe.send_forward(forward(i, pipe.recv_forward()))
    x = pipe.recv_forward() if steady else None
    for j in range(steady):
        grad = pipe.send_forward_recv_backward(forward(warmup + j, x))
        g_in = backward(j, grad)
        if j == steady - 1:
            pipe.send_backward(g_in)
        else:
            x = pipe.send_backward_recv_forward(g_in)
    for j in range(steady, m):  # cool-down: the backwards left from warm-up
        pipe.send_backward(backward(j, pipe.recv_backward()))
    return sum(losses)


def parallelize(model, grid, p):
    """Cut a whole model (built on the meta device by checkpoint.build_model) down to this
    rank's part of the layout."""
    grid.tied_head = model.lm_head.weight is model.embed.weight
    if grid.tp > 1:
        apply_tensor_parallel(model, grid)
    if grid.cp > 1:
        for block in model.layers:
            block.attn.attn_fn = partial(ring_attention, grid=grid)
    if grid.pp > 1:
        apply_pipeline(model, grid)
    for name, module in model.named_modules():  # the balance loss of the whole batch, wherever it is split
        if isinstance(module, MoE):
            module.reduce_counts = partial(moe_counts, grid=grid)
            module.aux_scale = 1 / grid.tp if grid.sequence_parallel else 1.0  # tp ranks' partial grads add up
            if grid.ep > 1:
                apply_expert_parallel(name, module, grid)
    model.recompute = p.recompute
    return model


# Expert parallelism (GShard, Lepikhin et al. 2020): rank r of an ep group keeps experts
# [r E/ep, (r+1) E/ep). A MoE layer's rows, sorted by expert, go to the ranks holding their
# experts in one all-to-all with uneven splits and come back in a second one; the router,
# attention and everything else stay data-parallel. An expert's gradient sums the tokens of
# its whole ep group, then the groups holding the same experts (edp_cp) add theirs.

class AllToAll(torch.autograd.Function):
    """send[i] rows of x to rank i of group, recv[i] rows from it; backward sends the rows'
    gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.args = (recv, send, group)
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return AllToAll.apply(grad, *ctx.args), None, None, None


def apply_expert_parallel(name, moe, grid):
    for proj in ("gate_proj", "up_proj", "down_proj"):
        setattr(moe, proj, nn.Parameter(getattr(moe, proj).detach().chunk(grid.ep)[grid.ep_rank].clone()))
        grid.ep_sharded.add(f"{name}.{proj}")
    moe.run_experts = partial(all_to_all_experts, moe, grid)


def all_to_all_experts(moe, grid, xs, counts):
    """MoE.run_experts across ranks: xs (rows, d) sorted by global expert, counts (E,) -> the
    experts' outputs in the same order. The split sizes are needed on the host: one sync."""
    group, ep = grid.groups["ep"], grid.ep
    local = counts.numel() // ep
    got = torch.empty_like(counts)
    dist.all_to_all_single(got, counts, group=group)          # (ep * local,): rows per (source, my expert)
    send, recv = counts.view(ep, local).sum(1).tolist(), got.view(ep, local).sum(1).tolist()
    rows = AllToAll.apply(xs, send, recv, group)              # grouped by source rank, then by my expert
    expert = torch.arange(local, device=xs.device).repeat(ep).repeat_interleave(got)
    order = expert.argsort(stable=True)                       # grouped by my expert
    out = moe.expert_swiglu(rows[order], got.view(ep, local).sum(0))[order.argsort()]
    return AllToAll.apply(out, recv, send, group)


def moe_counts(counts, grid):
    """Tokens per expert summed over the ranks that split the batch (dp, cp; tp under sequence
    parallelism). Each rank's balance loss then uses the global shares f_i with its own P_i,
    and the data-parallel average of those losses is the global batch's loss."""
    counts = all_reduce(counts, grid.groups.get("dp_cp"))
    return all_reduce(counts, grid.groups.get("tp")) if grid.sequence_parallel else counts


# ----------------------------------------------------------------------------------------
# 6. Data parallelism: gradients are averaged over the dp x cp ranks in buckets of about
#    bucket_mb, each launched asynchronously from a backward hook as soon as its last
#    gradient is accumulated, so communication overlaps the rest of backward (PyTorch DDP,
#    Li et al. 2020). Parameters and gradients live in one flat buffer per bucket. ZeRO
#    (Rajbhandari et al. 2020) shards across those ranks:
#      stage 1  AdamW state: reduce-scatter instead of all-reduce; each rank updates its
#               1/n of every bucket, then all-gathers the parameters
#      stage 2  and gradients: only the reduced 1/n outlives the reduction (the full
#               gradient buffer is freed until the next backward)
#      stage 3  and the blocks' parameters: a block's are all-gathered before its forward
#               (the next block's gather prefetched) and again before its backward, and freed
#               after each; its gradients are reduce-scattered as soon as they are complete.
#               The embedding, final norm and head stay whole, as in stage 2.
#    Gradients that are partial sums across tp (norms under sequence parallelism, QK-norm) or
#    pp (a tied head) are summed there before the data-parallel reduction: their parameters
#    sit in a last bucket, reduced in finish().

class Bucket:
    def __init__(self, named, n_ranks, rank, device, deferred=False, sharded=False):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        numel = sum(p.numel() for p in self.params)
        numel += -numel % n_ranks  # pad so the bucket splits evenly across ranks
        self.data = torch.zeros(numel, device=device)
        self.grad = torch.zeros(numel, device=device)
        self.offsets, offset = [], 0
        for p in self.params:
            # The parameter and its gradient become views into the flat buffers, as PyTorch
            # DDP's gradient buckets do: one collective per bucket, no copies in or out.
            self.data[offset:offset + p.numel()].copy_(p.detach().flatten())
            p.data = self.data[offset:offset + p.numel()].view_as(p)
            p.grad = self.grad[offset:offset + p.numel()].view_as(p)  # autograd accumulates in place
            self.offsets.append(offset)
            offset += p.numel()
        self.shard = torch.zeros(numel // n_ranks, device=device)   # this rank's reduced gradient slice
        # ZeRO-3 (sharded): this rank's slice of the parameters is all it keeps between uses.
        self.shard_data = self.data.chunk(n_ranks)[rank].clone() if sharded else None
        self.deferred, self.sharded, self.ready, self.handle = deferred, sharded, 0, None
        self.gathered, self.in_backward = True, False


def _resize(t, on):
    """Give t's storage back (on=False), or take it again (zeroed contents are the caller's to write)."""
    t.untyped_storage().resize_(t.numel() * t.element_size() if on else 0)


class DataParallel:
    def __init__(self, model, grid, zero=0, bucket_mb=25.0):
        self.grid = grid
        self.group = grid.groups.get("dp_cp")
        self.n = _size(self.group)
        self.rank = grid.dp_rank * grid.cp + grid.cp_rank
        self.zero = zero if self.n > 1 else 0
        self.sync = True     # False on gradient-accumulation micro-steps but the last
        self.events = []     # ("launch", bucket index) as they happen, for tests and VERBOSE
        self.buckets, self.pending = [], []
        if self.n == 1:
            return
        device = next(model.parameters()).device
        params = [(n, p) for n, p in model.named_parameters() if n not in grid.ep_sharded]  # finish_grads's
        self.unbucketed = [p for n, p in model.named_parameters() if n in grid.ep_sharded]
        deferred = grid.tp_partial | ({"embed.weight", "lm_head.weight"} if grid.tied_head and grid.pp > 1 else set())
        if self.zero == 3:  # one bucket per block; its cross-tp sums are made on the slices (finish)
            blocks = list(model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers)
            prefix = {id(block): name for name, block in model.named_modules() if block in blocks}
            for block in reversed(blocks):
                self._bucket([(f"{prefix[id(block)]}.{n}", p) for n, p in block.named_parameters()], device, block)
            params = [(n, p) for n, p in params if not n.startswith("layers.")]
        named, size = [], 0
        for name, p in reversed(params):  # backward meets the last layers first
            if name in deferred:
                continue
            named.append((name, p))
            size += p.numel() * 4
            if size >= bucket_mb * 2**20:
                self._bucket(named, device)
                named, size = [], 0
        if named:
            self._bucket(named, device)
        if held := [(n, p) for n, p in params if n in deferred]:
            self._bucket(held, device, deferred=True)

    def _bucket(self, named, device, block=None, deferred=False):
        b = len(self.buckets)
        bucket = Bucket(named, self.n, self.rank, device, deferred, sharded=block is not None)
        self.buckets.append(bucket)
        if not deferred:
            for p in bucket.params:
                p.register_post_accumulate_grad_hook(partial(self._grad_ready, b))
        if block is not None:  # ZeRO-3: the block's parameters live only while it runs
            _resize(bucket.data, False)
            bucket.gathered = False
            # Buckets are in backward order: the block that runs next in forward is b - 1.
            block.register_forward_pre_hook(lambda module, args: self._unshard(b, prefetch=b - 1))
            block.register_forward_hook(lambda module, args, out: self._after_forward(b, out))

    def _unshard(self, b, prefetch):
        """ZeRO-3: all-gather bucket b's parameters (waiting for a prefetch in flight), then start
        the gather of the block that runs next, so it overlaps this block's compute."""
        for i in (b, prefetch):
            bucket = self.buckets[i] if 0 <= i < len(self.buckets) else None
            if bucket is None or not bucket.sharded or bucket.gathered:
                continue
            _resize(bucket.data, True)
            bucket.handle = dist.all_gather_into_tensor(bucket.data, bucket.shard_data, group=self.group,
                                                        async_op=True)
            bucket.gathered = True
        self.buckets[b].handle, handle = None, self.buckets[b].handle
        if handle is not None:
            handle.wait()

    def _after_forward(self, b, out):
        bucket = self.buckets[b]
        if bucket.in_backward:  # a recomputed forward inside backward: backward still needs them
            return out
        _resize(bucket.data, False)
        bucket.gathered = False
        if out.requires_grad:
            out.register_hook(lambda grad: self._before_backward(b))
        return out

    def _before_backward(self, b):
        bucket = self.buckets[b]
        bucket.in_backward = True
        self._unshard(b, prefetch=b + 1)
        if bucket.grad.untyped_storage().size() == 0:
            _resize(bucket.grad, True)
            bucket.grad.zero_()

    def _grad_ready(self, b, _param):
        bucket = self.buckets[b]
        if not (self.sync or bucket.sharded):  # ZeRO-3 blocks free full gradients: they reduce every micro-step
            return
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(b)

    def _launch(self, b):
        bucket = self.buckets[b]
        self.events.append(("launch", b))
        if VERBOSE:
            print(f"[dp {self.rank}] bucket {b} ({bucket.grad.numel() * 4 / 2**20:.1f} MB) ready: "
                  f"{'reduce-scatter' if self.zero else 'all-reduce'} launched", flush=True)
        bucket.grad /= self.n  # average: the loss of each rank is a mean over its own tokens
        if bucket.sharded:  # ZeRO-3: into a fresh slice, added to the step's sum
            out = torch.empty_like(bucket.shard)
            handle = dist.reduce_scatter_tensor(out, bucket.grad, group=self.group, async_op=True)
            self.settle()
            self.pending.append((bucket, out, handle))
        elif self.zero:
            bucket.handle = dist.reduce_scatter_tensor(bucket.shard, bucket.grad, group=self.group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(bucket.grad, group=self.group, async_op=True)
        bucket.ready = 0

    def settle(self):
        """ZeRO-3: finish the reductions in flight and free those blocks' full parameters and
        gradients (after each micro-step's backward, and as each next block's reduction starts)."""
        for bucket, out, handle in self.pending:
            handle.wait()
            bucket.shard += out
            for t in (bucket.grad, bucket.data):
                _resize(t, False)
            bucket.gathered, bucket.in_backward = False, False
        self.pending = []

    def slices(self, bucket):
        """(name, parameter, offset in it, start, stop in this rank's slice) for every piece of
        a parameter that falls in this rank's 1/n of the bucket."""
        chunk = bucket.data.numel() // self.n
        lo, hi = self.rank * chunk, (self.rank + 1) * chunk
        for name, p, off in zip(bucket.names, bucket.params, bucket.offsets):
            a, b = max(lo, off), min(hi, off + p.numel())
            if a < b:
                yield name, p, a - off, a - lo, b - lo

    def finish(self):
        """Wait for every bucket's reduction (launching any whose hooks did not all fire, and
        the deferred bucket, whose cross-tp/pp sums the caller has made). ZeRO-3 blocks' tp
        partial sums are made here, on the reduced slices, which every tp rank cuts alike."""
        self.settle()
        for bucket in self.buckets if self.zero == 3 else ():
            for name, _, _, a, b in self.slices(bucket) if bucket.sharded else ():
                if name in self.grid.tp_partial:
                    all_reduce(bucket.shard[a:b], self.grid.groups.get("tp"))
        for b, bucket in enumerate(self.buckets):
            if bucket.sharded:
                continue
            if bucket.handle is None:
                self._launch(b)
            bucket.handle.wait()
            bucket.handle = None
            if self.zero >= 2:  # only the reduced slice outlives the reduction
                _resize(bucket.grad, False)

    def zero_grad(self, model):
        if not self.buckets:
            return model.zero_grad(set_to_none=True)
        for p in self.unbucketed:
            p.grad = None
        for bucket in self.buckets:
            if bucket.grad.untyped_storage().size() == 0 and not bucket.sharded:
                _resize(bucket.grad, True)
            if bucket.grad.untyped_storage().size():
                bucket.grad.zero_()
            bucket.shard.zero_()

    def optimizer_params(self, model):
        """(name, tensor) pairs the optimizer updates: every parameter, or under ZeRO the
        pieces of parameters that fall in this rank's slice of each bucket (views of the
        flat buffers, or of the kept slice under ZeRO-3, with gradients viewing the reduced
        slice). Names are canonical: a tied head on the last pipeline stage is the embedding."""
        if not self.zero:
            return [(canonical(n, self.grid), p) for n, p in model.named_parameters()]
        pieces = []
        for bucket in self.buckets:
            start = self.rank * (bucket.data.numel() // self.n)
            for name, p, at, a, b in self.slices(bucket):
                piece = bucket.shard_data[a:b] if bucket.sharded else bucket.data[start + a:start + b]
                piece.grad = bucket.shard[a:b]
                piece.zero_slot = (bucket, a, at)  # its place in my slice, in its parameter
                pieces.append((canonical(name, self.grid), piece))
        return pieces

    def after_step(self):
        """ZeRO: every rank gets the others' updated slices (ZeRO-3's blocks gather on use)."""
        for bucket in self.buckets if self.zero else ():
            if bucket.sharded:
                continue
            mine = bucket.data.chunk(self.n)[self.rank].clone()
            dist.all_gather_into_tensor(bucket.data, mine, group=self.group)


# ----------------------------------------------------------------------------------------
# 7. The training step

def forward_backward(model, grid, dp, batches, pcfg, autocast=contextlib.nullcontext(), backward=True, bos=None):
    """One optimizer step's forward and backward over batches [(inputs, targets)] (one per
    gradient-accumulation micro-step), in every layout. Returns the mean loss over the
    global batch, the same number on every rank. Under pipeline parallelism all micro-steps'
    micro-batches go through one schedule, so the bubble is (pp - 1) / (m + pp - 1) of the
    step for m micro-batches in all. Every path scales each loss by 1 / (micro-batches in
    the step), so all layouts average the same way. bos: packed documents start at this
    token (data.doc_mask), attention stays inside each (model.document_starts)."""
    x0 = batches[0][0]
    pos = torch.arange(x0.shape[1], device=x0.device)
    if grid.cp > 1:
        pos = context_chunks(x0, grid)[1]
        batches = [(context_chunks(x, grid)[0], context_chunks(y, grid)[0]) for x, y in batches]
    starts = [document_starts(x, bos) if bos is not None else None for x, _ in batches]
    if grid.pp > 1:
        m = microbatches(pcfg, len(x0))
        chunks = [(x, y, d) for (xs, ys), ds in zip(batches, starts)
                  for x, y, d in zip(xs.chunk(m), ys.chunk(m), ds.chunk(m) if ds is not None else [None] * m)]
        seq = batches[0][0].shape[1] // (grid.tp if grid.sequence_parallel else 1)
        param = next(model.parameters())
        pipe = Pipe(grid, (len(x0) // m, seq, model.cfg.d_model), param.dtype, x0.device)
        set_router_loss_scale(model, 1.0 / len(chunks))
        if backward:  # reduce gradients only during the very last backward of the step
            dp.sync = False
            loss = pipeline_schedule(model, grid, chunks, pos, 1.0 / len(chunks), pcfg.pp_schedule, pipe,
                                     lambda: setattr(dp, "sync", True), autocast)
        else:
            with torch.no_grad():
                loss = forward_only_pipeline(model, grid, chunks, pos, pipe, autocast)
        loss = torch.as_tensor(loss / len(chunks) if grid.last else 0.0, device=x0.device).float()
        loss = all_reduce(loss, grid.groups.get("pp"))  # the loss is known on the last stage only
    else:
        loss = torch.zeros((), device=x0.device)
        set_router_loss_scale(model, 1.0 / len(batches))
        for k, ((x, y), doc_starts) in enumerate(zip(batches, starts)):
            dp.sync = k == len(batches) - 1
            with torch.set_grad_enabled(backward), autocast:
                micro_loss = model(x, y, pos=pos, doc_starts=doc_starts)
            if backward:
                (micro_loss / len(batches)).backward()
                dp.settle()
            loss += micro_loss.detach().float() / len(batches)
    loss = all_reduce(loss, grid.groups.get("dp_cp")) / (grid.dp * grid.cp)
    if backward:
        finish_grads(model, grid, dp)
    return loss


def set_router_loss_scale(model, scale):
    """MoE router losses enter backward with the scale of the loss they are added to."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.loss_scale = scale


def forward_only_pipeline(model, grid, chunks, pos, pipe, autocast):
    """Validation through the pipeline: forwards only; the summed loss on the last stage."""
    losses = []
    for inputs, targets, doc_starts in chunks:
        x = pipe.recv_forward()
        with autocast:
            out = model(x.detach() if x is not None else inputs, targets, pos, doc_starts)
        if grid.last:
            losses.append(out.float())
        else:
            pipe.send_forward(out)
    return sum(losses) if losses else 0.0


def finish_grads(model, grid, dp):
    """After backward: sum the gradients that are partial sums over tp (replicated parameters
    that see only this rank's heads or slice of the sequence) and over pp (a tied embedding's
    two halves), then finish the data-parallel reduction, which holds those back for this."""
    params = {n: p for n, p in model.named_parameters() if p.grad is not None and p.grad.untyped_storage().size()}
    for name in sorted(grid.tp_partial):
        if name in params:
            all_reduce(params[name].grad, grid.groups.get("tp"))
    for name in sorted(grid.ep_sharded):  # outside the buckets: each rank's grad already sums its ep group's tokens
        if name in params:
            all_reduce(params[name].grad, grid.groups.get("edp_cp")).div_(grid.dp * grid.cp)
    if grid.tied_head and grid.pp > 1:
        name = "embed.weight" if grid.first else "lm_head.weight"
        all_reduce(params[name].grad, grid.groups.get("embed"))
    dp.finish()


def counts_once(name, grid):
    """Whether this rank's copy of a gradient counts in the global norm: a tp-replicated
    parameter counts on tp rank 0 only, the embedding (tied head) on the first stage only."""
    if name == "embed.weight" and not grid.first:
        return False
    return name in grid.tp_sharded or grid.tp_rank == 0


def clip_grad_norm(named, max_norm, grid, zero):
    """Global gradient norm over every shard in the grid; clip to max_norm (0: no clipping)."""
    sq, experts = (torch.zeros((), device=named[0][1].device) for _ in range(2))
    for n, t in named:
        if t.grad is not None and counts_once(n, grid):
            (experts if n in grid.ep_sharded else sq).add_(t.grad.float().pow(2).sum())
    sq += all_reduce(experts, grid.groups.get("ep"))  # each ep rank holds other experts
    for axis in ("tp", "pp") + (("dp_cp",) if zero else ()):
        sq = all_reduce(sq, grid.groups.get(axis))
    norm = sq.sqrt()
    if max_norm:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for _, t in named:
            if t.grad is not None:
                t.grad.mul_(coef)
    return norm


# ----------------------------------------------------------------------------------------
# 8. Names and pieces: whatever the layout, a tensor keeps model.py's name, and a rank holds a
#    part of it along one dimension (tp), or a flat range of that part (ZeRO). checkpoint.py
#    writes and reads pieces by these.

def canonical(name, grid):
    return "embed.weight" if grid.tied_head and name == "lm_head.weight" else name


def shard_spec(name, grid):
    """Which part of the whole tensor this rank holds for parameter name: (dim, index, count),
    its index-th of count chunks along dim; None: all of it."""
    if name in grid.ep_sharded:  # experts stay whole under tp
        return 0, grid.ep_rank, grid.ep
    dim = grid.tp_sharded.get(name)
    return None if dim is None else (dim, grid.tp_rank, grid.tp)


def piece_of(name, t, grid):
    """(tensor-parallel spec, flat range in that part or None): what tensor t holds of the whole
    tensor name; a ZeRO slice (zero_slot) holds a flat range of its parameter's part."""
    slot = getattr(t, "zero_slot", None)
    return shard_spec(name, grid), (slot[2], slot[2] + t.numel()) if slot else None
