// The operator library: the schemas of register.h declared as torch.ops.lstm_fused.*, and their
// CPU kernels. CUDA kernels are registered in cuda/register_cuda.cpp, autocast kernels in
// autocast.cpp; fake kernels and autograd in lstm_fused/ops.py.
#include <Python.h>

#include <torch/library.h>

#include "register.h"
#include "thread_team.h"

namespace {

// Runs `body`, turning a C++ exception into a Python ValueError/RuntimeError (nullptr returned).
template <typename F>
PyObject* guarded(F body) {
  try {
    return body();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

std::optional<at::ScalarType> dtype_from_name(const char* name) {
  for (const auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    if (std::string_view(name) == c10::getDtypeNames(dtype).first) {
      return dtype;
    }
  }
  return std::nullopt;
}

// lstm_fused.cpu_gemm's back end: the forced CPU GEMM path, the paths a dtype can use, and the
// cache of measured choices (gemm.cpp).
PyObject* cpu_gemm_mode(PyObject*, PyObject*) {
  return guarded([] { return PyUnicode_FromString(lstm_fused::cpu_gemm_mode().c_str()); });
}

PyObject* set_cpu_gemm_mode(PyObject*, PyObject* arg) {
  const char* mode = PyUnicode_AsUTF8(arg);
  if (mode == nullptr) return nullptr;
  return guarded([&] {
    lstm_fused::set_cpu_gemm_mode(mode);
    Py_RETURN_NONE;
  });
}

PyObject* cpu_gemm_paths(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const auto dtype = dtype_from_name(name);
  if (!dtype) {
    PyErr_Format(PyExc_ValueError, "lstm_fused: unknown dtype '%s'", name);
    return nullptr;
  }
  return guarded([&] {
    const auto paths = lstm_fused::cpu_gemm_paths(*dtype);
    PyObject* list = PyList_New(0);
    for (const auto& path : paths) {
      PyObject* item = PyUnicode_FromString(path.c_str());
      PyList_Append(list, item);
      Py_DECREF(item);
    }
    return list;
  });
}

// [(repeated, rows, n, k, dtype, threads, accumulate, out_stride, path, {path: seconds},
//   measurements, transposed, weight_transposed, column_groups, weight_as_stored)]
PyObject* cpu_gemm_choices(PyObject*, PyObject*) {
  return guarded([] {
    PyObject* list = PyList_New(0);
    for (const auto& [key, choice] : lstm_fused::cpu_gemm_choices()) {
      PyObject* seconds = PyDict_New();
      for (const auto& [path, s] : choice.seconds) {
        PyObject* value = PyFloat_FromDouble(s);
        PyDict_SetItemString(seconds, lstm_fused::cpu_gemm_path_name(path).c_str(), value);
        Py_DECREF(value);
      }
      PyObject* item = Py_BuildValue(
          "(OLLLsiOLsNiOOLO)", key.repeated ? Py_True : Py_False, static_cast<long long>(key.rows),
          static_cast<long long>(key.n), static_cast<long long>(key.k),
          std::string(c10::getDtypeNames(key.dtype).first).c_str(), key.threads,
          key.accumulate ? Py_True : Py_False, static_cast<long long>(key.out_stride),
          lstm_fused::cpu_gemm_path_name(choice.path).c_str(), seconds, choice.measurements,
          key.transposed ? Py_True : Py_False, key.weight_transposed ? Py_True : Py_False,
          static_cast<long long>(key.column_groups), key.weight_as_stored ? Py_True : Py_False);
      PyList_Append(list, item);
      Py_DECREF(item);
    }
    return list;
  });
}

PyObject* clear_cpu_gemm_choices(PyObject*, PyObject*) {
  return guarded([] {
    lstm_fused::clear_cpu_gemm_choices();
    Py_RETURN_NONE;
  });
}

PyObject* projection_chunk_rows(PyObject*, PyObject* args) {
  long long row_bytes = 0;
  if (!PyArg_ParseTuple(args, "L", &row_bytes)) return nullptr;
  return guarded([&] { return PyLong_FromLongLong(lstm_fused::projection_chunk_rows(row_bytes)); });
}

PyObject* forced_projection_chunk_rows(PyObject*, PyObject*) {
  return guarded([] { return PyLong_FromLongLong(lstm_fused::forced_projection_chunk_rows()); });
}

PyObject* set_projection_chunk_rows(PyObject*, PyObject* arg) {
  const long long rows = PyLong_AsLongLong(arg);
  if (rows == -1 && PyErr_Occurred()) return nullptr;
  return guarded([&] {
    lstm_fused::set_projection_chunk_rows(rows);
    Py_RETURN_NONE;
  });
}

// Test only: ({path: [trial seconds, ...]}, run_seconds), see lstm_fused::set_cpu_gemm_test_times.
PyObject* set_cpu_gemm_test_times(PyObject*, PyObject* args) {
  PyObject* trials = nullptr;
  double run_seconds = -1;
  if (!PyArg_ParseTuple(args, "O!d", &PyDict_Type, &trials, &run_seconds)) return nullptr;
  std::map<lstm_fused::CpuGemmPath, std::vector<double>> parsed;
  PyObject *name, *values;
  Py_ssize_t position = 0;
  while (PyDict_Next(trials, &position, &name, &values)) {
    const char* text = PyUnicode_AsUTF8(name);
    if (text == nullptr) return nullptr;
    std::optional<lstm_fused::CpuGemmPath> path;
    for (const auto p : {lstm_fused::CpuGemmPath::Aten, lstm_fused::CpuGemmPath::OneDnn,
                         lstm_fused::CpuGemmPath::Packed, lstm_fused::CpuGemmPath::Simd}) {
      if (lstm_fused::cpu_gemm_path_name(p) == text) path = p;
    }
    if (!path) {
      PyErr_Format(PyExc_ValueError, "lstm_fused: unknown CPU GEMM path '%s'", text);
      return nullptr;
    }
    PyObject* sequence = PySequence_Fast(values, "trial seconds must be a sequence");
    if (sequence == nullptr) return nullptr;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(sequence); ++i) {
      parsed[*path].push_back(PyFloat_AsDouble(PySequence_Fast_GET_ITEM(sequence, i)));
    }
    Py_DECREF(sequence);
    if (PyErr_Occurred()) return nullptr;
  }
  return guarded([&] {
    lstm_fused::set_cpu_gemm_test_times(std::move(parsed), run_seconds);
    Py_RETURN_NONE;
  });
}

// Test only: (threads, jobs, late_us, work_us, throw_at), see lstm_fused::thread_team_test.
PyObject* thread_team_test(PyObject*, PyObject* args) {
  long long threads = 0, jobs = 0, late_us = 0, work_us = 0, throw_at = -1;
  if (!PyArg_ParseTuple(args, "LLLLL", &threads, &jobs, &late_us, &work_us, &throw_at)) {
    return nullptr;
  }
  return guarded([&]() -> PyObject* {
    const std::vector<int64_t> counts =
        lstm_fused::thread_team_test(threads, jobs, late_us, work_us, throw_at);
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(counts.size()));
    for (size_t i = 0; list != nullptr && i < counts.size(); ++i) {
      PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), PyLong_FromLongLong(counts[i]));
    }
    return list;
  });
}

PyMethodDef methods[] = {
    {"cpu_gemm_mode", cpu_gemm_mode, METH_NOARGS, "The forced CPU GEMM path, or 'auto'."},
    {"set_cpu_gemm_mode", set_cpu_gemm_mode, METH_O, "Force a CPU GEMM path ('auto' measures)."},
    {"cpu_gemm_paths", cpu_gemm_paths, METH_O, "The CPU GEMM paths that run a dtype."},
    {"cpu_gemm_choices", cpu_gemm_choices, METH_NOARGS, "The measured choices, cached."},
    {"clear_cpu_gemm_choices", clear_cpu_gemm_choices, METH_NOARGS, "Forget them."},
    {"projection_chunk_rows", projection_chunk_rows, METH_VARARGS,
     "Rows of a projection chunk, for rows of that many bytes."},
    {"forced_projection_chunk_rows", forced_projection_chunk_rows, METH_NOARGS,
     "The forced projection chunk rows (0: from the L2 cache size)."},
    {"set_projection_chunk_rows", set_projection_chunk_rows, METH_O,
     "Force the projection chunk rows (0: from the L2 cache size)."},
    {"_set_cpu_gemm_test_times", set_cpu_gemm_test_times, METH_VARARGS,
     "Test only: deterministic trial and sample timings."},
    {"_thread_team_test", thread_team_test, METH_VARARGS,
     "Test only: run_on_threads jobs in a thread team with late threads."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import lstm_fused._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "lstm_fused operator library", -1,
                               methods};
  PyObject* m = PyModule_Create(&module);
#ifdef LSTM_FUSED_WITH_CUDA
  PyModule_AddIntConstant(m, "built_with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "built_with_cuda", 0);
#endif
  return m;
}

namespace lstm_fused {

TORCH_LIBRARY(lstm_fused, m) {
  for (const char* schema : {LSTM_FUSED_SCHEMAS("", ", bool need_backward=True")}) m.def(schema);
}

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) { LSTM_FUSED_IMPL_ALL(m, DeviceOps<cpu_kernels>); }

// Before the kernel of any device: the arguments' devices and layouts (ops.h).
TORCH_LIBRARY_IMPL(lstm_fused, BackendSelect, m) { register_argument_checks(m); }

}  // namespace lstm_fused
