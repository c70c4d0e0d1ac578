"""DSKD losses (Zhang et al., WACV 2024): per-pixel cosine (Eq. 1-2) and contextual affinity (Eq. 3-7).

Both losses are means of per-position discrepancy maps, and the same maps score test images (Sec. 3.5),
so this module computes maps; :class:`DualStudentLoss` averages them.

Memory and speed: the contextual affinity of a level with N = h*w positions is an N x N matrix per image
((64*64)^2 = 16.8 M entries at 256 px and stride 4, 268 M for a batch of 16). :class:`_ContextualAffinityKL`
computes it in chunks of rows into one reused buffer and differentiates it analytically: the backward pass
recomputes only the student's softmax of each chunk and nothing N-wide is kept between the passes, so the
peak memory is one (B, chunk, N) buffer. Each row is independent, so the chunked result equals the direct
one; :func:`_affinity_divergence` is the plain autograd definition it is tested against (and the path for
a teacher that requires a gradient). Measured on one CPU thread for a batch of 16 at level 1 of
``tf_efficientnet_lite0`` at 256 px (64 x 64 x 24) with 512-row chunks: forward + backward 1.8-2.0 s and
+183 MiB peak RSS, against 14.0-14.7 s and +689 MiB for chunks under gradient checkpointing, which
computed both softmaxes twice and kept autograd's intermediates of a chunk.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from distillad.components import cosine_distance_map

LOSS_TYPES = ("pixel", "affinity")
"""``"pixel"``: per-pixel cosine distance (Pi, Eq. 1-2); ``"affinity"``: contextual affinity (CA, Eq. 3-7)."""


def _affinity_divergence(student_rows: torch.Tensor, teacher_rows: torch.Tensor, teacher: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """T^2 * KL(P_T,i || P_S,i) for a chunk of rows i (Eq. 3-6); inputs are L2-normalised, returns (B, R).

    ``student_rows``/``teacher_rows``: (B, R, C) feature vectors f_S,i / f_T,i of the chunk;
    ``teacher``: (B, N, C) all teacher vectors f_T,j. Both affinities are taken against the *teacher*
    map (Eq. 3 and Eq. 5), so every student row is optimised independently of the other student rows.
    """
    keys = teacher.transpose(1, 2)
    log_p_teacher = torch.log_softmax(teacher_rows @ keys / temperature, dim=-1)  # Eq. 3-4
    log_p_student = torch.log_softmax(student_rows @ keys / temperature, dim=-1)  # Eq. 5 + Eq. 4
    return temperature**2 * (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)  # Eq. 6


def _reference_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk_rows: int) -> torch.Tensor:
    """:func:`_affinity_divergence` of every row, chunk by chunk, under plain autograd -> (B, N).

    The path for a teacher that requires a gradient (never DSKD's frozen one): autograd keeps every
    chunk's intermediates, so its memory grows with N x N.
    """
    rows = []
    for start in range(0, student.shape[1], chunk_rows):
        chunk = slice(start, start + chunk_rows)
        rows.append(_affinity_divergence(student[:, chunk], teacher[:, chunk], teacher, temperature))
    return torch.cat(rows, dim=1)


def _with_ones(teacher: torch.Tensor) -> torch.Tensor:
    """The (B, N, C) teacher vectors with a column of ones appended: (B, N, C + 1).

    The ones let a row shift ride in the logits' matrix product and give a softmax's denominator in the
    same product as its weighted mean, instead of separate passes over a (B, R, N) chunk.
    """
    return torch.cat([teacher, teacher.new_ones(*teacher.shape[:-1], 1)], dim=-1)


def _shifted_logits(rows: torch.Tensor, shift: torch.Tensor, teacher_ones: torch.Tensor, temperature: float,
                    out: torch.Tensor) -> torch.Tensor:
    """z_ij - shift_i for a chunk of rows i and all j, z_ij = f_i . f_T,j / T (the affinity of Eq. 3 or 5 over T).

    ``rows``: (B, R, C); ``shift``: (B, R, 1); ``teacher_ones``: see :func:`_with_ones`; written into
    ``out`` (B, R, N).
    """
    rows_and_shift = torch.cat([rows / temperature, -shift], dim=-1)
    return torch.bmm(rows_and_shift, teacher_ones.transpose(1, 2), out=out)


def _softmax_mean(weights: torch.Tensor, teacher_ones: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_j p_ij f_T,j (B, R, C) and sum_j w_ij (B, R) for softmax numerators w_ij (B, R, N) of rows i."""
    weighted = torch.bmm(weights, teacher_ones)
    return weighted[..., :-1] / weighted[..., -1:], weighted[..., -1]


def _chunk_buffer(workspace: torch.Tensor, batch: int, rows: int, positions: int) -> torch.Tensor:
    """The leading part of ``workspace`` as a contiguous (B, rows, N) tensor (the last chunk may be shorter).

    One buffer serves every chunk and both softmaxes: on a CPU a fresh (B, R, N) tensor costs more than
    the arithmetic on it (large blocks go back to the system and are page-faulted in again).
    """
    return workspace[: batch * rows * positions].view(batch, rows, positions)


def _affinity_rows(student: torch.Tensor, teacher_ones: torch.Tensor, temperature: float,
                   chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T^2 * KL(P_T,i || P_S,i) of every row i (Eq. 3-6) of unit vectors, chunk by chunk -> (B, N).

    ``student``: (B, N, C) vectors f_S,i; ``teacher_ones``: the teacher vectors f_T,j with ones
    (:func:`_with_ones`). With z_ij = f_i . f_T,j / T, lse_i = log sum_j exp(z_ij) and the teacher
    softmax's mean u_i = sum_j p_T,ij f_T,j, the cross term sum_j p_T,ij (z^t_ij - z^s_ij) is
    (f_T,i - f_S,i) . u_i / T, so T^2 * KL_i = T (f_T,i - f_S,i) . u_i + T^2 (lse^s_i - lse^t_i) (Eq. 6):
    neither log-softmax is formed.

    Also returns u (B, N, C) and the student's row maxima of z (B, N, 1), its softmax shifts: with the
    inputs, all that the backward pass of :class:`_ContextualAffinityKL` needs.
    """
    batch, positions, _ = student.shape
    teacher = teacher_ones[..., :-1]
    workspace = student.new_empty(batch * min(chunk_rows, positions) * positions)
    kl = student.new_empty(batch, positions)
    teacher_mean = torch.empty_like(student)
    student_max = student.new_empty(batch, positions, 1)
    for start in range(0, positions, chunk_rows):
        chunk = slice(start, start + chunk_rows)
        teacher_rows, student_rows = teacher[:, chunk], student[:, chunk]
        buffer = _chunk_buffer(workspace, batch, teacher_rows.shape[1], positions)
        # A unit (or zero) teacher row's largest logit is its own, |f_T,i|^2 / T (Eq. 3): with it as the
        # shift the exp cannot overflow and its sum, holding exp(0), cannot underflow.
        teacher_max = teacher_rows.square().sum(dim=-1, keepdim=True) / temperature
        weights = _shifted_logits(teacher_rows, teacher_max, teacher_ones, temperature, out=buffer).exp_()
        mean, teacher_sum = _softmax_mean(weights, teacher_ones)  # u_i (Eq. 3-4)
        # A student row's largest logit is known only from the logits themselves (Eq. 5).
        logits = _shifted_logits(student_rows, torch.zeros_like(teacher_max), teacher_ones, temperature, out=buffer)
        row_max = logits.amax(dim=-1, keepdim=True)
        student_sum = logits.sub_(row_max).exp_().sum(dim=-1)
        # lse^s - lse^t as (max^s - max^t) + log(sum^s / sum^t): no large normalisers are subtracted.
        log_normaliser_gap = (row_max - teacher_max).squeeze(-1) + torch.log(student_sum / teacher_sum)
        cross = ((teacher_rows - student_rows) * mean).sum(dim=-1)
        kl[:, chunk] = temperature * cross + temperature**2 * log_normaliser_gap  # Eq. 6
        teacher_mean[:, chunk], student_max[:, chunk] = mean, row_max
    return kl, teacher_mean, student_max


class _ContextualAffinityKL(torch.autograd.Function):
    """T^2 * KL(P_T,i || P_S,i) per row (Eq. 3-6) of unit vectors, differentiated analytically (student only).

    With s_ij = f_S,i . f_T,j, dKL_i/ds_ij = (p^s_ij - p^t_ij) / T, so the gradient of T^2 * KL_i is
    T * sum_j (p^s_ij - p^t_ij) f_T,j = T (v_i - u_i), v_i and u_i the means of the teacher vectors under
    the student's and the teacher's softmax. u comes from the forward pass; the backward pass recomputes
    only the student's softmax of each chunk, against its saved row maxima. Nothing N-wide is saved
    (inputs, u and the maxima: O(B N C)), so memory stays at one chunk.

    The teacher is the frozen encoder's output and gets no gradient; :func:`contextual_affinity_map`
    routes a teacher that requires one to :func:`_affinity_divergence`.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                chunk_rows: int) -> torch.Tensor:
        """(B, N) divergences of the (B, N, C) unit vectors ``student`` (f_S,i) and ``teacher`` (f_T,j)."""
        teacher_ones = _with_ones(teacher)
        kl, teacher_mean, student_max = _affinity_rows(student, teacher_ones, temperature, chunk_rows)
        ctx.save_for_backward(student, teacher_ones, teacher_mean, student_max)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_kl: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        """Gradient w.r.t. the student vectors: grad_kl_i * T * (v_i - u_i), chunk by chunk."""
        student, teacher_ones, teacher_mean, student_max = ctx.saved_tensors
        temperature, chunk_rows = ctx.temperature, ctx.chunk_rows
        batch, positions, _ = student.shape
        grad_student = torch.empty_like(student)
        # The forward pass ran in float32 or float64 (see contextual_affinity_map), so must this one, even
        # if backward() is called inside an autocast region.
        with torch.autocast(student.device.type, enabled=False):
            workspace = student.new_empty(batch * min(chunk_rows, positions) * positions)
            for start in range(0, positions, chunk_rows):
                chunk = slice(start, start + chunk_rows)
                student_rows = student[:, chunk]
                buffer = _chunk_buffer(workspace, batch, student_rows.shape[1], positions)
                weights = _shifted_logits(student_rows, student_max[:, chunk], teacher_ones, temperature,
                                          out=buffer).exp_()
                student_mean, _ = _softmax_mean(weights, teacher_ones)  # v_i (Eq. 5 + Eq. 4)
                grad_student[:, chunk] = (temperature * grad_kl[:, chunk, None]) * (student_mean - teacher_mean[:, chunk])
        return grad_student, None, None, None


def contextual_affinity_map(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0,
                            chunk_rows: int = 512) -> torch.Tensor:
    """Per-position contextual affinity discrepancy KL(P_T,i, P_S,i) (Eq. 6) of two (B, C, H, W) maps -> (B, 1, H, W).

    a^t_ij = cos(f_T,i, f_T,j) (Eq. 3) and a^s_ij = cos(f_S,i, f_T,j) (Eq. 5) are turned into
    distributions over j by a softmax with temperature T (Eq. 4) and compared with the KL divergence
    scaled by T^2 (Eq. 6). Its mean over positions is the level's term of Eq. 7 and the map itself is
    M^l_glo of Sec. 3.5. The result is float32 (float64 for float64 inputs), also under autocast: a
    softmax over N = h*w entries (4096 at level 1) is too coarse in bfloat16.

    Args:
        teacher: Teacher features F_T^l (differentiated only through the slow reference path).
        student: Student features F_S^l, same shape.
        temperature: Softmax temperature T (> 0).
        chunk_rows: Rows i evaluated at once (see the module docstring); any value gives the same result.
    """
    batch, _, height, width = teacher.shape
    dtype = torch.promote_types(torch.promote_types(teacher.dtype, student.dtype), torch.float32)
    with torch.autocast(teacher.device.type, enabled=False):
        teacher_vectors = F.normalize(teacher.flatten(2).transpose(1, 2).to(dtype), dim=-1)
        student_vectors = F.normalize(student.flatten(2).transpose(1, 2).to(dtype), dim=-1)
        if not torch.is_grad_enabled() or not (student_vectors.requires_grad or teacher_vectors.requires_grad):
            kl = _affinity_rows(student_vectors, _with_ones(teacher_vectors), temperature, chunk_rows)[0]
        elif teacher_vectors.requires_grad:
            kl = _reference_rows(student_vectors, teacher_vectors, temperature, chunk_rows)
        else:
            kl = _ContextualAffinityKL.apply(student_vectors, teacher_vectors, temperature, chunk_rows)
    return kl.view(batch, 1, height, width)


def discrepancy_maps(loss_type: str, teacher: list[torch.Tensor], student: list[torch.Tensor],
                     temperature: float = 1.0, chunk_rows: int = 512) -> list[torch.Tensor]:
    """Per-level (B, 1, h_l, w_l) maps: M^l_loc of Eq. 1 (``"pixel"``) or the KL map of Eq. 6 (``"affinity"``)."""
    if loss_type == "pixel":
        return [cosine_distance_map(t, s) for t, s in zip(teacher, student, strict=True)]
    return [contextual_affinity_map(t, s, temperature, chunk_rows) for t, s in zip(teacher, student, strict=True)]


class DualStudentLoss(nn.Module):
    """L = L_loc + L_glo, each the sum over levels of the mean per-position discrepancy (Eq. 2 and Eq. 7).

    Each student has its own loss type (Tables 4-5); the mean also runs over the batch. The two students
    share no parameters, so the sum trains each exactly on its own loss (Adam is per parameter), which is
    the paper's "trained simultaneously".

    Args:
        loss_types: Loss type per student name (``{"local": "pixel", "global": "affinity"}`` in the paper).
        temperature: Softmax temperature T of the contextual affinity.
        chunk_rows: Row chunk of the contextual affinity.
    """

    def __init__(self, loss_types: dict[str, str], temperature: float = 1.0, chunk_rows: int = 512) -> None:
        super().__init__()
        self.loss_types = dict(loss_types)
        self.temperature = temperature
        self.chunk_rows = chunk_rows

    def forward(self, teacher: list[torch.Tensor], students: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """Total loss for the teacher features F_T^1..3 and each student's reconstructions."""
        total = 0
        for name, features in students.items():
            maps = discrepancy_maps(self.loss_types[name], teacher, features, self.temperature, self.chunk_rows)
            total = total + sum(level.mean() for level in maps)
        return total
