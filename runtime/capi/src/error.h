// Internal errors: thrown inside the library, turned into an m3rt_status at the C boundary.
#pragma once

#include <stdexcept>
#include <string>

#include "m3rt.h"

namespace m3rt {

class Error : public std::runtime_error {
 public:
    Error(m3rt_code code, const std::string& message) : std::runtime_error(message), code_(code) {}
    m3rt_code code() const { return code_; }

 private:
    m3rt_code code_;
};

}  // namespace m3rt
