/* SHA-256 of a journal line as 64 lowercase hex digits, for the compiled verify loop (_chain_c).
 *
 * With HEIDI_HAVE_OPENSSL (setup.py defines it when it can compile and link against libcrypto)
 * this is OpenSSL's SHA256 -- the very code hashlib runs, SHA-NI included -- called without a
 * Python call per line. Without it, a portable FIPS 180-4 implementation: slower, same digest.
 */
#ifndef HEIDI_SHA256_H
#define HEIDI_SHA256_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static const char heidi_hex_digits[] = "0123456789abcdef";

static void heidi_to_hex(const unsigned char *md, char *out)
{
    for (int i = 0; i < 32; i++) {
        out[2 * i] = heidi_hex_digits[md[i] >> 4];
        out[2 * i + 1] = heidi_hex_digits[md[i] & 15];
    }
}

#ifdef HEIDI_HAVE_OPENSSL
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/sha.h>

static void heidi_sha256_hex(const unsigned char *data, size_t n, char *out)
{
    unsigned char md[32];
    SHA256_CTX ctx;
    SHA256_Init(&ctx);
    SHA256_Update(&ctx, data, n);
    SHA256_Final(md, &ctx);
    heidi_to_hex(md, out);
}

#define HEIDI_SHA256_IMPL "openssl"
#else

static const uint32_t heidi_k256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define HEIDI_ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void heidi_sha256_block(uint32_t *h, const unsigned char *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = ((uint32_t)p[4 * i] << 24) | ((uint32_t)p[4 * i + 1] << 16)
             | ((uint32_t)p[4 * i + 2] << 8) | (uint32_t)p[4 * i + 3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = HEIDI_ROR(w[i - 15], 7) ^ HEIDI_ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = HEIDI_ROR(w[i - 2], 17) ^ HEIDI_ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
    for (i = 0; i < 64; i++) {
        t1 = k + (HEIDI_ROR(e, 6) ^ HEIDI_ROR(e, 11) ^ HEIDI_ROR(e, 25)) + ((e & f) ^ (~e & g))
           + heidi_k256[i] + w[i];
        t2 = (HEIDI_ROR(a, 2) ^ HEIDI_ROR(a, 13) ^ HEIDI_ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

static void heidi_sha256_hex(const unsigned char *data, size_t n, char *out)
{
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    unsigned char tail[128], md[32];
    size_t full = n & ~(size_t)63, rest = n - full, i;
    uint64_t bits = (uint64_t)n * 8;
    for (i = 0; i < full; i += 64)
        heidi_sha256_block(h, data + i);
    memset(tail, 0, sizeof tail);
    memcpy(tail, data + full, rest);
    tail[rest] = 0x80;
    size_t padded = rest + 9 <= 64 ? 64 : 128;
    for (i = 0; i < 8; i++)
        tail[padded - 1 - i] = (unsigned char)(bits >> (8 * i));
    heidi_sha256_block(h, tail);
    if (padded == 128)
        heidi_sha256_block(h, tail + 64);
    for (i = 0; i < 8; i++) {
        md[4 * i] = (unsigned char)(h[i] >> 24);
        md[4 * i + 1] = (unsigned char)(h[i] >> 16);
        md[4 * i + 2] = (unsigned char)(h[i] >> 8);
        md[4 * i + 3] = (unsigned char)h[i];
    }
    heidi_to_hex(md, out);
}

#define HEIDI_SHA256_IMPL "portable"
#endif

#endif
