"""DSKD losses (Zhang et al., WACV 2024): per-pixel cosine (Eq. 1-2) and contextual affinity (Eq. 3-7).

Both losses are means of per-position discrepancy maps, and the same maps score test images (Sec. 3.5),
so this module computes maps; :class:`DualStudentLoss` averages them.

Memory: the contextual affinity of a level with N = h*w positions is an N x N matrix per image
((64*64)^2 = 16.8 M entries at 256 px and stride 4, 268 M for a batch of 16). It is computed in chunks
of rows, and during training every chunk is gradient-checkpointed (recomputed in the backward pass), so
the peak memory is that of one chunk instead of the whole matrix and its softmax intermediates. Each row
is independent, so the chunked result equals the direct one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def contextual_affinity_map(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0,
                            chunk_rows: int = 512) -> torch.Tensor:
    """Per-position contextual affinity discrepancy KL(P_T,i, P_S,i) (Eq. 6) of two (B, C, H, W) maps -> (B, 1, H, W).

    a^t_ij = cos(f_T,i, f_T,j) (Eq. 3) and a^s_ij = cos(f_S,i, f_T,j) (Eq. 5) are turned into
    distributions over j by a softmax with temperature T (Eq. 4) and compared with the KL divergence
    scaled by T^2 (Eq. 6). Its mean over positions is the level's term of Eq. 7 and the map itself is
    M^l_glo of Sec. 3.5.

    Args:
        teacher: Teacher features F_T^l (no gradient needed).
        student: Student features F_S^l, same shape.
        temperature: Softmax temperature T (> 0).
        chunk_rows: Rows i evaluated at once (see the module docstring); any value gives the same result.
    """
    batch, _, height, width = teacher.shape
    teacher_vectors = F.normalize(teacher.flatten(2).transpose(1, 2), dim=-1)
    student_vectors = F.normalize(student.flatten(2).transpose(1, 2), dim=-1)
    keep_graph = torch.is_grad_enabled() and student_vectors.requires_grad
    rows = []
    for start in range(0, height * width, chunk_rows):
        chunk = slice(start, start + chunk_rows)
        arguments = (student_vectors[:, chunk], teacher_vectors[:, chunk], teacher_vectors, temperature)
        if keep_graph:
            rows.append(checkpoint(_affinity_divergence, *arguments, use_reentrant=False))
        else:
            rows.append(_affinity_divergence(*arguments))
    return torch.cat(rows, dim=1).view(batch, 1, height, width)


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
