// Causal grouped-query attention over the KV cache, one (head, query token, key split) per
// workgroup.
// q: n_tokens rows of q_stride f32, head h at q_off + h * head_dim (a fused QKV row works).
// kv: K heads at k_off and V heads at v_off, each [n_kv_heads, ctx, head_dim] f32.
// Query t sits at position pos0 + t and sees keys 0 ..= pos0 + t (causal); query head h
// reads KV head h / (n_heads / n_kv_heads). Softmax is online (running max and sum, one
// chunk of WG keys at a time), so it is numerically stable for any context length.
//   out[t, out_off + h * head_dim + d] = sum_j softmax_j(scale * q.k_j) v_j[d]
// Split-K (flash decoding), for decode over long contexts where n_heads workgroups would
// leave most of the GPU idle: with PARTIAL = 1, workgroup z takes keys
// [z * split_len, (z + 1) * split_len) and writes its unnormalized acc[head_dim], running
// max m and sum l to out[((t * n_heads + h) * n_splits + z) * (head_dim + 2) ..];
// attention_combine.wgsl merges the splits. With PARTIAL = 0 there is one split.
// Needs head_dim <= WG, head_dim % 4 == 0, k_off % 4 == 0 (kv is read as vec4).
// Grid: (n_heads, n_tokens, n_splits).

override WG: u32 = 64u;
override PARTIAL: u32 = 0u;

struct Params {
  n_tokens: u32, n_heads: u32, n_kv_heads: u32, head_dim: u32,
  q_stride: u32, q_off: u32, ctx: u32, k_off: u32,
  v_off: u32, pos0: u32, out_stride: u32, out_off: u32,
  scale: f32, split_len: u32, n_splits: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kv: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const NEG_BIG: f32 = -3.0e38;  // stands for -inf; exp(NEG_BIG - m) == 0

var<workgroup> qh: array<vec4<f32>, WG / 4u>;
var<workgroup> probs: array<f32, WG>;
var<workgroup> red: array<f32, WG>;

fn reduce_max(v: f32, lid: u32) -> f32 {
  red[lid] = v;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
    workgroupBarrier();
  }
  let r = red[0];
  workgroupBarrier();
  return r;
}

fn reduce_sum(v: f32, lid: u32) -> f32 {
  red[lid] = v;
  workgroupBarrier();
  for (var s = WG / 2u; s > 0u; s >>= 1u) {
    if (lid < s) { red[lid] += red[lid + s]; }
    workgroupBarrier();
  }
  let r = red[0];
  workgroupBarrier();
  return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
  let h = wg.x;
  let t = wg.y;
  let kvh = h / (p.n_heads / p.n_kv_heads);
  let n_keys = p.pos0 + t + 1u;
  let key0 = wg.z * p.split_len;
  let key1 = min(n_keys, key0 + p.split_len);
  let hd4 = p.head_dim / 4u;
  if (lid < hd4) {
    let qb = t * p.q_stride + p.q_off + h * p.head_dim + 4u * lid;
    qh[lid] = vec4<f32>(q[qb], q[qb + 1u], q[qb + 2u], q[qb + 3u]) * p.scale;
  }
  workgroupBarrier();
  let kbase4 = (p.k_off + kvh * p.ctx * p.head_dim) / 4u;
  let vbase = p.v_off + kvh * p.ctx * p.head_dim;
  var m = NEG_BIG;
  var l = 0.0;
  var acc = 0.0;
  for (var c = key0; c < key1; c += WG) {
    let j = c + lid;
    var s = NEG_BIG;
    if (j < key1) {
      var d4 = vec4<f32>(0.0);
      let kr = kbase4 + j * hd4;
      for (var d = 0u; d < hd4; d++) {
        d4 += qh[d] * kv[kr + d];
      }
      s = d4.x + d4.y + d4.z + d4.w;
    }
    let m_new = max(m, reduce_max(s, lid));
    let pj = select(0.0, exp(s - m_new), j < key1);
    probs[lid] = pj;
    let alpha = exp(m - m_new);
    l = l * alpha + reduce_sum(pj, lid);  // reduce_sum's barriers also publish probs
    if (lid < p.head_dim) {
      var a = acc * alpha;
      let cn = min(WG, key1 - c);
      for (var i = 0u; i < cn; i++) {
        let vi = vbase + (c + i) * p.head_dim + lid;
        a += probs[i] * kv[vi / 4u][vi % 4u];
      }
      acc = a;
    }
    m = m_new;
    workgroupBarrier();  // everyone is done with probs before the next chunk writes it
  }
  if (PARTIAL != 0u) {
    let pb = ((t * p.n_heads + h) * p.n_splits + wg.z) * (p.head_dim + 2u);
    if (lid < p.head_dim) { out[pb + lid] = acc; }
    if (lid == 0u) {
      out[pb + p.head_dim] = m;
      out[pb + p.head_dim + 1u] = l;
    }
  } else if (lid < p.head_dim) {
    out[t * p.out_stride + p.out_off + h * p.head_dim + lid] = acc / l;
  }
}
