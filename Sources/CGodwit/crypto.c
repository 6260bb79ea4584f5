// HMAC-SHA256, constant-time comparison and random bytes from OpenSSL's libcrypto (3.x, EVP_MAC),
// behind plain non-variadic functions for Swift (the Migration stream's authentication).
#include "CGodwit.h"
#include <limits.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>

// A godwit_hmac is an EVP_MAC_CTX keyed once; the struct is never defined, only cast.
static EVP_MAC_CTX *context(godwit_hmac *hmac) { return (EVP_MAC_CTX *)hmac; }

godwit_hmac *godwit_hmac_new(const void *key, size_t key_length) {
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (mac == NULL) return NULL;
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(mac);
    EVP_MAC_free(mac); // the context keeps its own reference
    if (ctx == NULL) return NULL;
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
        OSSL_PARAM_construct_end(),
    };
    if (EVP_MAC_init(ctx, (const unsigned char *)key, key_length, params) != 1) {
        EVP_MAC_CTX_free(ctx);
        return NULL;
    }
    return (godwit_hmac *)ctx;
}

int godwit_hmac_init(godwit_hmac *hmac) {
    // A NULL key restarts the computation with the key set by godwit_hmac_new.
    return EVP_MAC_init(context(hmac), NULL, 0, NULL) == 1 ? 0 : -1;
}

int godwit_hmac_update(godwit_hmac *hmac, const void *data, size_t length) {
    if (length == 0) return 0;
    return EVP_MAC_update(context(hmac), (const unsigned char *)data, length) == 1 ? 0 : -1;
}

int godwit_hmac_final(godwit_hmac *hmac, uint8_t *out) {
    size_t written = 0;
    if (EVP_MAC_final(context(hmac), out, &written, GODWIT_HMAC_SHA256_LENGTH) != 1) return -1;
    return written == GODWIT_HMAC_SHA256_LENGTH ? 0 : -1;
}

void godwit_hmac_free(godwit_hmac *hmac) { EVP_MAC_CTX_free(context(hmac)); }

int godwit_hmac_sha256(const void *key, size_t key_length, const void *data, size_t length, uint8_t *out) {
    godwit_hmac *hmac = godwit_hmac_new(key, key_length);
    if (hmac == NULL) return -1;
    int rc = godwit_hmac_update(hmac, data, length) == 0 ? godwit_hmac_final(hmac, out) : -1;
    godwit_hmac_free(hmac);
    return rc;
}

int godwit_constant_time_equal(const void *a, const void *b, size_t length) {
    return CRYPTO_memcmp(a, b, length) == 0 ? 1 : 0;
}

int godwit_random_bytes(void *out, size_t length) {
    if (length > INT_MAX) return -1;
    return RAND_bytes((unsigned char *)out, (int)length) == 1 ? 0 : -1;
}
