// numerics="ggml": activation rows -> Q8_0 / Q8_1 blocks as ggml's quantize_row_q8_0 /
// quantize_row_q8_1 make them on x86 (AVX path; ggml_numerics._quantize_q8):
//   amax = max |x_j|; d = amax / 127; id = amax != 0 ? 127 / amax : 0;
//   q_j = round_half_even(x_j * id); block d = f16(d); Q8_1: s = f16(d * sum_j q_j).
// Row r (k floats at x_off + r * x_stride) -> k / 32 blocks, block i = r * nb + b:
//   xq[2i], xq[2i + 1]: the 32 int8 (element 4w + j in byte j of word w);
//   xd[i] = (f16(d), s) as floats (s = 0 for Q8_0).
// c127 is 127.0 from a uniform, so no compiler turns the division into a multiplication.
// One invocation per block. Grid: (min(G, 65535), ceil(G / 65535)) with G = ceil(n_rows * nb / 64).

//!include ggml_lib

struct Params { n_rows: u32, k: u32, x_off: u32, x_stride: u32, with_sum: u32, c127: f32, zero: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> xq: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> xd: array<vec2<f32>>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let nb = p.k / 32u;
  let i = (wg.x + wg.y * nwg.x) * 64u + lid;
  if (i >= p.n_rows * nb) { return; }
  let r = i / nb;
  let b = i % nb;
  let base = p.x_off + r * p.x_stride + b * 32u;
  var amax = 0.0;
  for (var j = 0u; j < 32u; j++) { amax = max(amax, abs(x[base + j])); }
  let d = div_x(amax, p.c127);
  var id = 0.0;
  if (amax != 0.0) { id = div_x(p.c127, amax); }
  var total = 0;
  var words: array<u32, 8>;
  for (var w = 0u; w < 8u; w++) {
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
      let q = i32(clamp(round(x[base + 4u * w + j] * id), -128.0, 127.0));
      total += q;
      word |= (u32(q) & 0xffu) << (8u * j);
    }
    words[w] = word;
  }
  xq[2u * i] = vec4<u32>(words[0], words[1], words[2], words[3]);
  xq[2u * i + 1u] = vec4<u32>(words[4], words[5], words[6], words[7]);
  xd[i] = vec2<f32>(f16r(d), select(0.0, f16r(d * f32(total)), p.with_sum != 0u));
}
