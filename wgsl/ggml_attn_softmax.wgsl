// numerics="ggml", attention part 2 of 3: softmax of one row of scores (query head h of token
// t over keys 0 .. pos0 + t) as ggml_vec_soft_max_f32: e = v_expf(s - max); the sum per 16
// keys by halving, those sums added in double in order (a double-float here); then
// p = f16(e * (float)(1 / sum)), f16 as the kqv product rounds it. In place in scores.
// One invocation per (token, head). Grid: (ceil(n_tokens * n_heads / 64), 1, 1).

//!include ggml_lib

struct Params { n_tokens: u32, n_heads: u32, pos0: u32, n_keys: u32, zero: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> scores: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  if (gid.x >= p.n_tokens * p.n_heads) { return; }
  let t = gid.x / p.n_heads;
  let n_valid = p.pos0 + t + 1u;
  let row = gid.x * p.n_keys;
  var mx = scores[row];
  for (var j = 1u; j < n_valid; j++) { mx = max(mx, scores[row + j]); }
  var total = vec2<f32>(0.0, 0.0);
  var lanes: array<f32, 16>;
  for (var c = 0u; c < n_valid; c += 16u) {
    for (var l = 0u; l < 16u; l++) {
      var e = 0.0;
      if (c + l < n_valid) {
        e = v_expf(scores[row + c + l] - mx).x;
        scores[row + c + l] = e;
      }
      lanes[l] = e;
    }
    for (var n = 8u; n > 0u; n = n / 2u) {
      for (var l = 0u; l < n; l++) { lanes[l] = lanes[l] + lanes[l + n]; }
    }
    total = dd_add(total, lanes[0]);
  }
  let inv = dd_div_to_f32(1.0, total);
  for (var j = 0u; j < n_valid; j++) { scores[row + j] = f16r(scores[row + j] * inv); }
}
