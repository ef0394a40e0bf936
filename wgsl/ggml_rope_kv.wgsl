// numerics="ggml": RoPE on Q and K (ggml's rotate_pairs as GCC compiles it:
// a' = fma(a, cos, -(b * sin)), b' = fma(a, sin, b * cos)), with ggml_rope_cache_init's
// cos/sin table computed on the CPU (tab: cos (tab_n, n_rot / 2), then sin), then K and V
// stored in the cache as f16 values (ggml_numerics.rope, attention).
// qkv row t at t * qkv_stride: Q heads, K heads from k_off, V heads from v_off; Q is rotated
// and rounded to f16 in place (attention only uses f16(q)). cache: (2, n_kv_heads, ctx, head_dim), V at cache_v_off. Pairs (2i, 2i + 1), or
// (i, i + n_rot / 2) with neox; dimensions from n_rot on are not rotated.
// One invocation per (token, head slot: Q heads, then K heads, then V heads).
// Grid: (ceil(n_tokens * (n_heads + 2 n_kv_heads) / 64), 1, 1).

//!include ggml_lib

struct Params { n_tokens: u32, n_heads: u32, n_kv_heads: u32, head_dim: u32, n_rot: u32,
                pos0: u32, ctx: u32, qkv_stride: u32, k_off: u32, v_off: u32, neox: u32,
                cache_v_off: u32, tab_n: u32, zero: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> tab: array<f32>;
@group(0) @binding(3) var<storage, read_write> cache: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let slots = p.n_heads + 2u * p.n_kv_heads;
  if (gid.x >= p.n_tokens * slots) { return; }
  let t = gid.x / slots;
  let s = gid.x % slots;
  let pos = p.pos0 + t;
  let hd = p.head_dim;
  let row = t * p.qkv_stride;
  if (s >= p.n_heads + p.n_kv_heads) {  // V head: f16 into the cache
    let h = s - p.n_heads - p.n_kv_heads;
    for (var d = 0u; d < hd; d++) {
      cache[p.cache_v_off + (h * p.ctx + pos) * hd + d] = f16r(qkv[row + p.v_off + h * hd + d]);
    }
    return;
  }
  let is_q = s < p.n_heads;
  let base = row + select(p.k_off + (s - p.n_heads) * hd, s * hd, is_q);
  let half = p.n_rot / 2u;
  for (var i = 0u; i < half; i++) {
    let ia = select(2u * i, i, p.neox != 0u);
    let ib = select(2u * i + 1u, i + half, p.neox != 0u);
    let c = tab[pos * half + i];
    let sn = tab[p.tab_n * half + pos * half + i];
    let a = qkv[base + ia];
    let b = qkv[base + ib];
    let ra = fma_x(a, c, -(b * sn));
    let rb = fma_x(a, sn, b * c);
    // Q is only ever used rounded to f16 (kq = mul_mat(k_f16, f16(q))): round it here, once
    qkv[base + ia] = select(ra, f16r(ra), is_q);
    qkv[base + ib] = select(rb, f16r(rb), is_q);
  }
  if (is_q) {  // the dimensions RoPE leaves alone
    for (var d = p.n_rot; d < hd; d++) { qkv[base + d] = f16r(qkv[base + d]); }
  }
  if (!is_q) {
    let h = s - p.n_heads;
    for (var d = 0u; d < hd; d++) {
      cache[(h * p.ctx + pos) * hd + d] = f16r(qkv[base + d]);
    }
  }
}
