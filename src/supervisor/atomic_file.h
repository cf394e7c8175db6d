// Replaces a file so that readers see the old state or the complete new file,
// never a partial one, even across a crash or power loss: write "<name>.tmp",
// fsync it, rename it over <name>, fsync the directory.
#pragma once

#include <cstddef>

#include "error_text.h"

namespace ndq::supervisor {

// `dir_fd` is the open directory; false with *error set on failure.
bool WriteFileAtomically(int dir_fd, const char* name, const char* data, size_t len, ErrorText* error);

}  // namespace ndq::supervisor
