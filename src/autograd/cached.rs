//! Forward-only ops for decoding with a key/value cache (`nn::decode`): RoPE at the positions
//! after the cached ones, attention over cached plus new keys (appending the new ones), and
//! taking the last rows. They record no backward: their outputs enter the tape as constants,
//! and they refuse to run on a tape that could differentiate (only `Tape::inference` tapes,
//! which compute no auxiliary losses, accept them).

use super::{Tape, Var};
use crate::backend::{AbsorbDims, AbsorbSide, AttnDims, Backend, DsaDims, LatentDims, LayerCache, RopeKind};
use anyhow::{ensure, Result};

impl<'p, B: Backend> Tape<'p, B> {
    fn check_inference(&self, op: &str) -> Result<()> {
        ensure!(!self.aux_enabled(), "{op}: cached decoding has no backward; run it on a Tape::inference tape");
        Ok(())
    }

    /// An op's output that no gradient flows through.
    fn constant(&mut self, a: B::A, shape: &[usize]) -> Var {
        self.input_a(a, shape)
    }

    /// Rotary embedding of x viewed as [b, t, h, head_dim]: positions `0..t` of each sequence
    /// (`p0` None: [`Tape::rope`], the training op), or, with a cache, positions `p0..p0 + t` of
    /// one sequence (b = 1; forward only).
    pub fn rope_at(
        &mut self,
        x: Var,
        (b, t, h): (usize, usize, usize),
        kind: RopeKind,
        p0: Option<usize>,
    ) -> Result<Var> {
        let Some(p0) = p0 else { return self.rope(x, (b, t, h), kind) };
        self.check_inference("rope_at")?;
        ensure!(b == 1, "rope_at: a cached forward runs one sequence, got {b}");
        let y = self.backend().rope_at(self.get(x), (t, h), p0, kind)?;
        let shape = self.shape(x).to_vec();
        Ok(self.constant(y, &shape))
    }

    /// Dense or window attention (the cache's kind) of new rows q, k, v (positions
    /// `cache.len()..`, after RoPE) over the cached and new keys; appends k and v to the cache.
    pub fn attention_cached(&mut self, q: Var, k: Var, v: Var, dims: AttnDims, cache: &mut LayerCache) -> Result<Var> {
        self.check_inference("attention_cached")?;
        let y = self.backend().attention_cached(&dims, self.get(q), self.get(k), self.get(v), cache)?;
        let shape = self.shape(q).to_vec();
        Ok(self.constant(y, &shape))
    }

    /// DSA attention of new rows over the cache (see `Backend::dsa_attention_cached`): the
    /// indexer (qi, ki, wi as for [`Tape::dsa_attention`]) selects among cached and new keys;
    /// appends k, v and ki.
    pub fn dsa_attention_cached(
        &mut self,
        (q, k, v): (Var, Var, Var),
        (qi, ki, wi): (Var, Var, Var),
        dims: DsaDims,
        dense: bool,
        cache: &mut LayerCache,
    ) -> Result<Var> {
        self.check_inference("dsa_attention_cached")?;
        let (qkv, index) = ((self.get(q), self.get(k), self.get(v)), (self.get(qi), self.get(ki), self.get(wi)));
        let y = self.backend().dsa_attention_cached(&dims, qkv, index, dense, cache)?;
        let shape = self.shape(q).to_vec();
        Ok(self.constant(y, &shape))
    }

    /// MLA decoding: `wkv_b`'s up-projection absorbed into the query (x = q_nope `[n, h, d_nope]`
    /// → `[n, h, rank]`) or the output (x = o_lat `[n, h, rank]` → `[n, h, d_v]`), per head.
    pub fn mla_absorb(&mut self, x: Var, wkv_b: Var, dims: AbsorbDims, side: AbsorbSide) -> Result<Var> {
        self.check_inference("mla_absorb")?;
        let y = self.backend().mla_absorb(&dims, side, self.get(x), self.get(wkv_b))?;
        let width = match side {
            AbsorbSide::Query => dims.rank,
            AbsorbSide::Output => dims.d_v,
        };
        Ok(self.constant(y, &[dims.n, dims.h, width]))
    }

    /// MLA decoding: attention of absorbed queries q `[n, h, rank + rope]` over the latent cache
    /// and the new latent rows kv `[n, rank + rope]` (see `Backend::latent_attention_cached`; a
    /// DSA layer passes its indexer's qi, ki, wi and shapes); appends kv. Returns `[n, h, rank]`.
    pub fn latent_attention_cached(
        &mut self,
        q: Var,
        kv: Var,
        dims: LatentDims,
        index: Option<(Var, Var, Var, DsaDims)>,
        dense: bool,
        cache: &mut LayerCache,
    ) -> Result<Var> {
        self.check_inference("latent_attention_cached")?;
        let index = index.map(|(qi, ki, wi, ds)| (ds, (self.get(qi), self.get(ki), self.get(wi))));
        let index = index.as_ref().map(|(ds, ix)| (ds, *ix));
        let y = self.backend().latent_attention_cached(&dims, self.get(q), self.get(kv), index, dense, cache)?;
        Ok(self.constant(y, &[dims.t, dims.h, dims.rank]))
    }

    /// The last `rows` rows of x [n, width] (forward only).
    pub fn last_rows(&mut self, x: Var, rows: usize) -> Result<Var> {
        self.check_inference("last_rows")?;
        let shape = self.shape(x).to_vec();
        let (n, width) = (shape[0], shape[1..].iter().product::<usize>());
        ensure!(rows <= n, "last_rows: {rows} of {n} rows");
        let host = self.to_host(x)?;
        let y = self.backend().a_from(&host[(n - rows) * width..])?;
        let mut out_shape = shape;
        out_shape[0] = rows;
        Ok(self.constant(y, &out_shape))
    }
}
