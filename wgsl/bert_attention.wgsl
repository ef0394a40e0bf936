// Bidirectional multi-head self-attention over a padded batch (BERT encoder):
//   out[s, t, h, :] = sum_j softmax_j(scale * q[s, t, h] . k[s, j, h]) v[s, j, h]
// over the keys j < seq_len of the same sequence s whose mask is nonzero (a zero-mask key
// gets probability 0: what HF's additive float32-min bias gives, exp underflowing to 0).
// A query with no visible key gets zeros (its sequence pools to a zero vector anyway).
// qkv: [n_seq * seq_len, qkv_stride] f32 rows, q | k | v, each n_heads * HD wide, heads side by
// side (the fused projection's output); out: [n_seq * seq_len, n_heads * HD].
// mask: [n_seq, seq_len] u32. HD (head_dim) is a multiple of 4, at most 4 * MAX_HD4.
// One thread per query row; a workgroup takes WQ query rows of one (sequence, head) and walks
// the keys WQ at a time, staging their K and V rows in workgroup memory (every thread reads
// the same key at once: a broadcast). The softmax is online: a running max m and sum l,
// rescaled once per 4 keys, so no score is ever exponentiated above 0 (stable for any length).
// Grid: (ceil(seq_len / WQ), n_heads, n_seq).

override WQ: u32 = 32u;
override HD: u32 = 32u;
const MAX_HD4: u32 = 16u;  // HD <= 64; per-thread arrays need a fixed size, loops run to HD / 4
const NEG_BIG: f32 = -3.0e38;  // stands for -inf; exp(NEG_BIG - m) == 0

struct Params { seq_len: u32, n_heads: u32, qkv_stride: u32, scale: f32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> qkv: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<vec4<f32>>;

var<workgroup> ks: array<vec4<f32>, WQ * HD / 4u>;  // [WQ keys][HD / 4]
var<workgroup> vs: array<vec4<f32>, WQ * HD / 4u>;
var<workgroup> live: array<f32, WQ>;  // 1.0 for a visible key, 0.0 for a masked or absent one

@compute @workgroup_size(WQ)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let hd4 = HD / 4u;
  let stride4 = p.qkv_stride / 4u;
  let width4 = p.n_heads * hd4;  // q, k and v are each this many vec4 wide
  let h = wg.y;
  let row0 = wg.z * p.seq_len;  // first row of this sequence
  let t = wg.x * WQ + lid;  // this thread's query
  let has_query = t < p.seq_len;
  var q: array<vec4<f32>, MAX_HD4>;
  var acc: array<vec4<f32>, MAX_HD4>;
  for (var d = 0u; d < hd4; d++) {
    acc[d] = vec4<f32>(0.0);
    q[d] = vec4<f32>(0.0);
    if (has_query) { q[d] = qkv[(row0 + t) * stride4 + h * hd4 + d] * p.scale; }
  }
  var m = NEG_BIG;
  var l = 0.0;
  for (var c = 0u; c < p.seq_len; c += WQ) {
    let j = c + lid;  // this thread stages key j
    let present = j < p.seq_len;
    let kb = (row0 + j) * stride4 + width4 + h * hd4;
    for (var d = 0u; d < hd4; d++) {
      var kv = vec4<f32>(0.0);
      var vv = vec4<f32>(0.0);
      if (present) {
        kv = qkv[kb + d];
        vv = qkv[kb + width4 + d];
      }
      ks[lid * hd4 + d] = kv;
      vs[lid * hd4 + d] = vv;
    }
    live[lid] = select(0.0, 1.0, present && mask[row0 + j] != 0u);
    workgroupBarrier();
    let n_keys = min(WQ, p.seq_len - c);
    for (var g = 0u; g < n_keys; g += 4u) {  // keys g .. g + 3 (live is 0 past n_keys)
      var s = vec4<f32>(0.0);
      for (var d = 0u; d < hd4; d++) {
        let qd = q[d];
        s += vec4<f32>(dot(qd, ks[g * hd4 + d]), dot(qd, ks[(g + 1u) * hd4 + d]),
                       dot(qd, ks[(g + 2u) * hd4 + d]), dot(qd, ks[(g + 3u) * hd4 + d]));
      }
      let ok = vec4<f32>(live[g], live[g + 1u], live[g + 2u], live[g + 3u]) > vec4<f32>(0.0);
      s = select(vec4<f32>(NEG_BIG), s, ok);
      let m_new = max(m, max(max(s.x, s.y), max(s.z, s.w)));
      let alpha = exp(m - m_new);
      let pr = select(vec4<f32>(0.0), exp(s - m_new), ok);
      l = l * alpha + ((pr.x + pr.y) + (pr.z + pr.w));
      for (var d = 0u; d < hd4; d++) {
        acc[d] = acc[d] * alpha + pr.x * vs[g * hd4 + d] + pr.y * vs[(g + 1u) * hd4 + d]
                 + pr.z * vs[(g + 2u) * hd4 + d] + pr.w * vs[(g + 3u) * hd4 + d];
      }
      m = m_new;
    }
    workgroupBarrier();  // all threads are done with ks, vs, live before the next keys land
  }
  if (!has_query) { return; }
  let inv_l = select(0.0, 1.0 / l, l > 0.0);
  for (var d = 0u; d < hd4; d++) {
    out[(row0 + t) * width4 + h * hd4 + d] = acc[d] * inv_l;
  }
}
