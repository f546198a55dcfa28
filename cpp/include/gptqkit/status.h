// Error reporting for every public gptqkit entry point.
//
// The library never throws across its public boundary and never calls exit()
// or abort(): each operation returns a Status. Callers (the Python bindings,
// native applications) decide how to surface it.
#pragma once

#include <string>
#include <utility>

namespace gptqkit {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,    // wrong shape, dtype, stride, value range, NaN/Inf input
  kNotPositiveDefinite,// Hessian not positive definite even after the damping retries
  kUnsupported,        // valid request this build cannot serve (e.g. no CUDA backend)
  kInternal,           // a bug or an allocation failure
};

class Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
  static Status NotPositiveDefinite(std::string m) { return {StatusCode::kNotPositiveDefinite, std::move(m)}; }
  static Status Unsupported(std::string m) { return {StatusCode::kUnsupported, std::move(m)}; }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

}  // namespace gptqkit
