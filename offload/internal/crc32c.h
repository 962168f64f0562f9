// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum the storage engine keeps per
// block. Uses the SSE4.2 crc32 instruction where the CPU has it, a table otherwise; both give the
// same value. Crc32c("123456789") == 0xE3069283. Thread-safe (pure functions).
#pragma once

#include <cstddef>
#include <cstdint>

namespace tandem::offload::internal {

// CRC32C of `num_bytes` bytes, continuing from `crc` (0 for a fresh checksum).
uint32_t Crc32c(const void* data, size_t num_bytes, uint32_t crc = 0);
// The table implementation, exposed so tests can compare it with the hardware path.
uint32_t Crc32cPortable(const void* data, size_t num_bytes, uint32_t crc = 0);

}  // namespace tandem::offload::internal
