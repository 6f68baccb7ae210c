//! Embedding: out[i, :] = table[ids[i], :]; backward scatter-adds rows of dout.

use rayon::prelude::*;

/// `table` is [vocab, dim]; ids must already be checked to be < vocab.
pub fn embedding_forward(table: &[f32], dim: usize, ids: &[u32], out: &mut [f32]) {
    assert_eq!(out.len(), ids.len() * dim, "embedding_forward: out must be [n, dim]");
    out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(row, &id)| {
        let s = id as usize * dim;
        row.copy_from_slice(&table[s..s + dim]);
    });
}

/// dtable[ids[i]] += dout[i]. Sequential over tokens (in order, so deterministic); cheap next to the GEMMs.
pub fn embedding_backward(dout: &[f32], dim: usize, ids: &[u32], dtable: &mut [f32]) {
    assert_eq!(dout.len(), ids.len() * dim, "embedding_backward: dout must be [n, dim]");
    for (row, &id) in dout.chunks_exact(dim).zip(ids) {
        let s = id as usize * dim;
        for (d, g) in dtable[s..s + dim].iter_mut().zip(row) {
            *d += g;
        }
    }
}
