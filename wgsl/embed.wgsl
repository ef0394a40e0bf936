// Embedding lookup: out[t, :] = dequant(table row ids[t]) as f32.
// The table is the GGUF tensor's raw bytes, read as u32 words (blocks need not be 4-aligned).
// QTYPE is the GGML type id: 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0.
// One thread per output element; grid: (min(G, 65535), ceil(G / 65535)) with
// G = ceil(n_tokens * dim / WG).

override QTYPE: u32 = 8u;
override WG: u32 = 256u;

struct Params { n_tokens: u32, dim: u32, out_off: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn byte_at(o: u32) -> u32 {
  return (table[o >> 2u] >> ((o & 3u) * 8u)) & 0xffu;
}

fn half_at(o: u32) -> f32 {  // o even
  let w = table[o >> 2u];
  return unpack2x16float(select(w, w >> 16u, (o & 2u) != 0u)).x;
}

fn element(row: u32, j: u32) -> f32 {
  let e = row * p.dim + j;  // flat element index; dim is a multiple of 32 for block types
  switch QTYPE {
    case 0u: { return bitcast<f32>(table[e]); }
    case 1u: { return half_at(e * 2u); }
    case 2u: {  // Q4_0: f16 d, 16 B nibbles; x = d * (q - 8)
      let o = (e / 32u) * 18u;
      let i = e % 32u;
      let q = (byte_at(o + 2u + (i % 16u)) >> ((i / 16u) * 4u)) & 0xfu;
      return half_at(o) * (f32(q) - 8.0);
    }
    case 3u: {  // Q4_1: f16 d, f16 m, 16 B nibbles; x = d * q + m
      let o = (e / 32u) * 20u;
      let i = e % 32u;
      let q = (byte_at(o + 4u + (i % 16u)) >> ((i / 16u) * 4u)) & 0xfu;
      return half_at(o) * f32(q) + half_at(o + 2u);
    }
    default: {  // Q8_0: f16 d, 32 int8; x = d * q
      let o = (e / 32u) * 34u;
      let q = bitcast<i32>(byte_at(o + 2u + e % 32u) << 24u) >> 24u;
      return half_at(o) * f32(q);
    }
  }
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
  let g = (wg.x + wg.y * nwg.x) * WG + lid;
  if (g >= p.n_tokens * p.dim) { return; }
  let t = g / p.dim;
  let j = g % p.dim;
  out[p.out_off + g] = element(ids[t], j);
}
