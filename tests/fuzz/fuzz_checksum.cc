// Checksums a job writes (`checksum`) and checksum files fetched from a URL the
// job names (`checksum_url`): ParseChecksum and ChecksumFromFile.
// Input: CHECKSUM \0 FILE_NAME \0 TYPE_HINT \0 CHECKSUM_FILE_CONTENT (may hold \0).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "image/checksum.h"

namespace {

std::string_view Next(std::string_view* rest) {
  const size_t nul = rest->find('\0');
  std::string_view part = rest->substr(0, nul);
  rest->remove_prefix(nul == std::string_view::npos ? rest->size() : nul + 1);
  return part;
}

void CheckResult(const absl::StatusOr<ndq::Checksum>& c) {
  if (!c.ok()) return;
  // A parsed checksum is always a known type with its exact number of lowercase hex digits.
  if (ndq::HexLengthForType(c->type) == 0 || c->hex.size() != ndq::HexLengthForType(c->type)) __builtin_trap();
  for (char ch : c->hex) {
    if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'))) __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  const std::string checksum(Next(&rest));
  const std::string file_name(Next(&rest));
  const std::string type_hint(Next(&rest));
  const std::string content(rest);

  absl::StatusOr<ndq::Checksum> parsed = ndq::ParseChecksum(checksum);
  CheckResult(parsed);
  if (parsed.ok() && !(ndq::ParseChecksum(parsed->ToString()).value_or(ndq::Checksum{}) == *parsed)) {
    __builtin_trap();  // TYPE:HEX round-trips
  }
  absl::StatusOr<ndq::Checksum> from_file = ndq::ChecksumFromFile(content, file_name, type_hint);
  CheckResult(from_file);
  return 0;
}
