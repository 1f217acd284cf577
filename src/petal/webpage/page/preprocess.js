// The preprocessing contract of petal.json, in the browser, pixel for pixel as Python's
// petal.images.load_pixels does it: an upright RGB image -> the (S, S, 3) uint8 input of model.onnx.
//
// A canvas resize is not Pillow's (other filters, no antialiasing when shrinking), so the
// resize is Pillow's own algorithm (the two-pass fixed-point convolution of its Resample.c),
// ported: same filter, the support widened by the scale when shrinking (antialiased), the
// same 22-bit fixed-point rounding, and the same crop box ("resize the short side to
// S / crop_pct, then center-crop S", done as one resample of the central square).
"use strict";

const PetalPreprocess = (() => {
  const PRECISION_BITS = 22;  // 32 - 8 - 2, as in Pillow
  const HALF = 2 ** (PRECISION_BITS - 1), ONE = 2 ** PRECISION_BITS, MAX = 2 ** (PRECISION_BITS + 8);

  const FILTERS = {  // name -> [support, kernel]; bicubic is Keys' with a = -0.5
    bilinear: [1.0, (x) => { x = Math.abs(x); return x < 1 ? 1 - x : 0; }],
    bicubic: [2.0, (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    }],
  };

  // Source window and fixed-point weights of each output pixel along one axis: the source
  // span [in0, in1) (float32, as Pillow keeps the box) -> outSize pixels.
  // Returns {ksize, bounds: Int32Array(2 * outSize) of [first, count], kk: Float64Array(outSize * ksize)}.
  function coefficients(inSize, in0, in1, outSize, filter) {
    const [support0, kernel] = FILTERS[filter];
    const scale = Math.fround(Math.fround(in1) - Math.fround(in0)) / outSize;
    const filterscale = Math.max(scale, 1.0);  // shrinking widens the kernel: antialiasing
    const support = support0 * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const bounds = new Int32Array(outSize * 2), kk = new Float64Array(outSize * ksize);
    const w = new Float64Array(ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = Math.fround(in0) + (xx + 0.5) * scale;
      const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
      const count = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
      let sum = 0;
      for (let x = 0; x < count; x++) {
        w[x] = kernel((x + xmin - center + 0.5) / filterscale);
        sum += w[x];
      }
      for (let x = 0; x < count; x++) {
        const k = sum !== 0 ? w[x] / sum : w[x];
        kk[xx * ksize + x] = Math.trunc(k < 0 ? -0.5 + k * ONE : 0.5 + k * ONE);  // C's (int) cast
      }
      bounds[2 * xx] = xmin;
      bounds[2 * xx + 1] = count;
    }
    return { ksize, bounds, kk };
  }

  function clip8(ss) {  // a fixed-point sum -> 0..255, as Pillow's clip8
    if (ss >= MAX) return 255;
    if (ss <= 0) return 0;
    return Math.floor(ss / ONE);
  }

  // One pass of the separable resize over an RGBA buffer `src` of width srcW: along rows
  // (horizontal: output pixel x reads src pixels bounds[x] of its row) or along columns
  // (output row y reads src rows bounds[y]). Returns outW x outH RGBA.
  function pass(src, c, outW, outH, horizontal, srcW) {
    const out = new Uint8ClampedArray(outW * outH * 4);
    const step = horizontal ? 4 : srcW * 4;
    for (let y = 0; y < outH; y++) {
      for (let x = 0; x < outW; x++) {
        const i = horizontal ? x : y;
        const first = c.bounds[2 * i], count = c.bounds[2 * i + 1], k0 = i * c.ksize;
        let p = horizontal ? (y * srcW + first) * 4 : (first * srcW + x) * 4;
        let r = HALF, g = HALF, b = HALF;
        for (let t = 0; t < count; t++, p += step) {
          const k = c.kk[k0 + t];
          r += src[p] * k; g += src[p + 1] * k; b += src[p + 2] * k;
        }
        const o = (y * outW + x) * 4;
        out[o] = clip8(r); out[o + 1] = clip8(g); out[o + 2] = clip8(b); out[o + 3] = 255;
      }
    }
    return out;
  }

  // RGBA pixels (w x h, alpha already composited) -> Uint8Array(S * S * 3) RGB, as load_pixels.
  function resizeCrop(rgba, w, h, pre) {
    const S = pre.input_size, side = Math.min(w, h) * pre.crop_pct;
    const left = (w - side) / 2, top = (h - side) / 2;
    const box = [left, top, left + side, top + side].map(Math.fround);
    const ch = coefficients(w, box[0], box[2], S, pre.resample);
    const cv = coefficients(h, box[1], box[3], S, pre.resample);
    let img = rgba, width = w, height = h;
    if (S !== w || box[0] !== 0 || box[2] !== S) {
      // only the rows the vertical pass reads: shift its windows to start at the first of them
      const first = cv.bounds[0], last = cv.bounds[2 * S - 2] + cv.bounds[2 * S - 1];
      for (let i = 0; i < S; i++) cv.bounds[2 * i] -= first;
      img = pass(rgba.subarray(first * w * 4, last * w * 4), ch, S, last - first, true, w);
      width = S; height = last - first;
    }
    if (S !== h || box[1] !== 0 || box[3] !== S) {
      img = pass(img, cv, width, S, false, width);
    }
    const out = new Uint8Array(S * S * 3);
    for (let i = 0, j = 0; i < S * S * 4; i += 4) {
      out[j++] = img[i]; out[j++] = img[i + 1]; out[j++] = img[i + 2];
    }
    return out;
  }

  // An image source (ImageBitmap, video frame...) -> RGBA at its own size, transparency on white
  // (no browser resampling: the resize above is the only one).
  function rgbaOf(source, w, h) {
    const canvas = new OffscreenCanvas(w, h);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, w, h);
    ctx.drawImage(source, 0, 0);
    return ctx.getImageData(0, 0, w, h).data;
  }

  // A File or Blob -> model input; rejects with a readable reason when it is not an image.
  async function fromBlob(blob, pre) {
    let bitmap;
    try {  // upright as EXIF says; pixel values as stored (Pillow ignores ICC profiles)
      bitmap = await createImageBitmap(blob, { imageOrientation: "from-image", colorSpaceConversion: "none",
                                               premultiplyAlpha: "none" });
    } catch (e) {
      throw new Error("not an image this browser can decode");
    }
    const { width, height } = bitmap;
    const pixels = resizeCrop(rgbaOf(bitmap, width, height), width, height, pre);
    bitmap.close();
    return pixels;
  }

  return { coefficients, resizeCrop, rgbaOf, fromBlob };
})();
