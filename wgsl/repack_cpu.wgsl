// Repack a quantized matrix for the CPU-adapter matvec (ops.py, cpu_kernels.py): raw GGUF blocks
// -> the quants of every block as plain bytes in an rgba32uint texture (16 bytes a texel, read
// with one textureLoad, which CPU adapters serve with one 16-byte load per invocation instead
// of four emulated gathers) + the f16 scales in a buffer. Run once per matrix.
//   QTYPE 3 (Q4_1): a unit is one block (5 words): d[u] = its [d | m] word, 1 texel of nibbles.
//   QTYPE 2 (Q4_0): a unit is two blocks (36 B, 9 words): d[u] = d0 | d1 << 16, 2 texels.
//   QTYPE 8 (Q8_0): a unit is two blocks (68 B, 17 words): d[u] = d0 | d1 << 16, 4 texels.
// Unit u = r * units + c (row r, c-th unit of the row) goes to texels (tx + c * TPU + i, ty) with
// tx = (r / H) * tpr, ty = r % H: rows fold into columns of tpr texels when rows > H.
// Grid: (min(G, 65535), ceil(G / 65535)), G = ceil(rows * units / WG).

override QTYPE: u32 = 3u;
override WG: u32 = 64u;

struct Params { rows: u32, units: u32, H: u32, tpr: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read_write> d: array<u32>;
@group(0) @binding(3) var qt: texture_storage_2d<rgba32uint, write>;

fn funnel(a: u32, b: u32) -> u32 {  // the 4 bytes starting 2 bytes into word a
  return (a >> 16u) | (b << 16u);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let u = (wg.x + wg.y * nwg.x) * WG + lid;
  if (u >= p.rows * p.units) { return; }
  let r = u / p.units;
  let c = u % p.units;
  let ty = i32(r % p.H);
  let tx = i32((r / p.H) * p.tpr);
  if (QTYPE == 3u) {
    let o = u * 5u;
    d[u] = w[o];
    textureStore(qt, vec2<i32>(tx + i32(c), ty), vec4<u32>(w[o + 1u], w[o + 2u], w[o + 3u], w[o + 4u]));
  } else if (QTYPE == 2u) {
    let o = u * 9u;
    d[u] = (w[o] & 0xffffu) | (w[o + 4u] & 0xffff0000u);
    let x0 = tx + i32(c * 2u);
    textureStore(qt, vec2<i32>(x0, ty), vec4<u32>(funnel(w[o], w[o + 1u]), funnel(w[o + 1u], w[o + 2u]),
                                                 funnel(w[o + 2u], w[o + 3u]), funnel(w[o + 3u], w[o + 4u])));
    textureStore(qt, vec2<i32>(x0 + 1, ty), vec4<u32>(w[o + 5u], w[o + 6u], w[o + 7u], w[o + 8u]));
  } else {
    let o = u * 17u;
    d[u] = (w[o] & 0xffffu) | (w[o + 8u] & 0xffff0000u);
    let x0 = tx + i32(c * 4u);
    textureStore(qt, vec2<i32>(x0, ty), vec4<u32>(funnel(w[o], w[o + 1u]), funnel(w[o + 1u], w[o + 2u]),
                                                 funnel(w[o + 2u], w[o + 3u]), funnel(w[o + 3u], w[o + 4u])));
    textureStore(qt, vec2<i32>(x0 + 1, ty), vec4<u32>(funnel(w[o + 4u], w[o + 5u]), funnel(w[o + 5u], w[o + 6u]),
                                                     funnel(w[o + 6u], w[o + 7u]), funnel(w[o + 7u], w[o + 8u])));
    textureStore(qt, vec2<i32>(x0 + 2, ty), vec4<u32>(w[o + 9u], w[o + 10u], w[o + 11u], w[o + 12u]));
    textureStore(qt, vec2<i32>(x0 + 3, ty), vec4<u32>(w[o + 13u], w[o + 14u], w[o + 15u], w[o + 16u]));
  }
}
