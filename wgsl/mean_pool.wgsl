// Sentence embeddings: masked mean over each sequence's tokens, then L2 normalization, as
// sentence-transformers' Pooling(mean) + Normalize:
//   e[s, j] = sum_t x[s, t, j] m[s, t] / max(sum_t m[s, t], 1e-9)
//   out[out_off + s * dim + j] = e[s, j] / max(|e[s]|, 1e-12)
// x: [n_seq, seq_len, dim] f32 (padded batch); mask: [n_seq, seq_len] u32, 0 = padding
// (any nonzero value counts as 1). A sequence with no token gives a zero vector.
// One sequence per workgroup of WG threads (a power of two): each thread pools every WG-th
// column over the tokens (consecutive threads read consecutive columns), writes it to out,
// then the squared norm is reduced in workgroup memory and each thread rescales its own
// columns. Grid: (n_seq).

override WG: u32 = 128u;

struct Params { seq_len: u32, dim: u32, out_off: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let s = wg.x;
  let mrow = s * p.seq_len;
  var count = 0.0;
  for (var t = 0u; t < p.seq_len; t++) {
    count += select(0.0, 1.0, mask[mrow + t] != 0u);
  }
  let denom = max(count, 1e-9);
  var ss = 0.0;
  for (var j = lid; j < p.dim; j += WG) {
    var acc = 0.0;
    for (var t = 0u; t < p.seq_len; t++) {
      if (mask[mrow + t] != 0u) { acc += x[(mrow + t) * p.dim + j]; }
    }
    let e = acc / denom;
    out[p.out_off + s * p.dim + j] = e;
    ss += e * e;
  }
  red[lid] = ss;
  workgroupBarrier();
  for (var st = WG / 2u; st > 0u; st >>= 1u) {
    if (lid < st) { red[lid] += red[lid + st]; }
    workgroupBarrier();
  }
  let norm = max(sqrt(red[0]), 1e-12);
  for (var j = lid; j < p.dim; j += WG) {
    let o = p.out_off + s * p.dim + j;
    out[o] = out[o] / norm;
  }
}
