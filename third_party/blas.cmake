# Build glue: find a BLAS/LAPACK for gptqkit and expose it as the INTERFACE
# target `gptqkit_blas`. No third-party code lives in this repository.
#
# GPTQKIT_BLAS selects the provider:
#   system          find_package(BLAS) + find_package(LAPACK): OpenBLAS, MKL, BLIS+libflame,
#                   Accelerate, ... (Debian/Ubuntu: apt install libopenblas-dev)
#   scipy-openblas  the OpenBLAS build published on PyPI as `scipy-openblas32` (what a
#                   `pip install` uses: no system package needed). Its symbols carry the
#                   prefix `scipy_`, and Python loads the library when gptqkit is imported.
#   auto            system if found, else scipy-openblas if that Python package is importable.
if(TARGET gptqkit_blas)
  return()
endif()
if(NOT DEFINED GPTQKIT_BLAS)
  set(GPTQKIT_BLAS auto)
endif()

set(_gptqkit_blas_found FALSE)
if(GPTQKIT_BLAS STREQUAL "system" OR GPTQKIT_BLAS STREQUAL "auto")
  if(NOT DEFINED BLA_VENDOR)
    # Prefer OpenBLAS (fast, threaded, LAPACK included); fall back to any vendor.
    set(BLA_VENDOR OpenBLAS)
    find_package(BLAS QUIET)
    find_package(LAPACK QUIET)
    if(NOT (BLAS_FOUND AND LAPACK_FOUND))
      unset(BLA_VENDOR)
      find_package(BLAS QUIET)
      find_package(LAPACK QUIET)
    endif()
  else()
    find_package(BLAS QUIET)
    find_package(LAPACK QUIET)
  endif()
  if(BLAS_FOUND AND LAPACK_FOUND)
    add_library(gptqkit_blas INTERFACE)
    target_link_libraries(gptqkit_blas INTERFACE LAPACK::LAPACK BLAS::BLAS)
    set(_gptqkit_blas_found TRUE)
    set(GPTQKIT_BLAS_RESOLVED system)
  elseif(GPTQKIT_BLAS STREQUAL "system")
    message(FATAL_ERROR "gptqkit: GPTQKIT_BLAS=system but no BLAS/LAPACK was found. "
                        "Install one (Debian/Ubuntu: apt install libopenblas-dev) "
                        "or configure with -DGPTQKIT_BLAS=scipy-openblas after `pip install scipy-openblas32`.")
  endif()
endif()

if(NOT _gptqkit_blas_found AND (GPTQKIT_BLAS STREQUAL "scipy-openblas" OR GPTQKIT_BLAS STREQUAL "auto"))
  if(NOT Python3_EXECUTABLE)
    find_package(Python3 COMPONENTS Interpreter QUIET)
  endif()
  if(Python3_EXECUTABLE)
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" -c
              "import scipy_openblas32 as s, os; print(os.path.join(s.get_lib_dir(), s.get_library(True)))"
      OUTPUT_VARIABLE _gptqkit_sob_lib OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE _gptqkit_sob_rc ERROR_QUIET)
  endif()
  if(Python3_EXECUTABLE AND _gptqkit_sob_rc EQUAL 0 AND EXISTS "${_gptqkit_sob_lib}")
    add_library(gptqkit_blas INTERFACE)
    target_compile_definitions(gptqkit_blas INTERFACE GPTQKIT_BLAS_PREFIX=scipy_)
    if(SKBUILD)
      # The wheel must not remember the temporary build environment: link by
      # soname only; `import gptqkit` loads scipy_openblas32's copy first.
      get_filename_component(_gptqkit_sob_dir "${_gptqkit_sob_lib}" DIRECTORY)
      target_link_directories(gptqkit_blas INTERFACE "${_gptqkit_sob_dir}")
      target_link_libraries(gptqkit_blas INTERFACE scipy_openblas)
    else()
      target_link_libraries(gptqkit_blas INTERFACE "${_gptqkit_sob_lib}")
    endif()
    set(_gptqkit_blas_found TRUE)
    set(GPTQKIT_BLAS_RESOLVED scipy-openblas)
  elseif(GPTQKIT_BLAS STREQUAL "scipy-openblas")
    message(FATAL_ERROR "gptqkit: GPTQKIT_BLAS=scipy-openblas but the Python package scipy_openblas32 "
                        "is not importable by ${Python3_EXECUTABLE}: pip install scipy-openblas32")
  endif()
endif()

if(NOT _gptqkit_blas_found)
  message(FATAL_ERROR "gptqkit needs BLAS and LAPACK. Either install a system one "
                      "(Debian/Ubuntu: apt install libopenblas-dev; Fedora: dnf install openblas-devel) "
                      "or `pip install scipy-openblas32` and configure with -DGPTQKIT_BLAS=scipy-openblas.")
endif()
message(STATUS "gptqkit: BLAS/LAPACK provider: ${GPTQKIT_BLAS_RESOLVED}")
