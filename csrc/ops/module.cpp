// The Python module fastlora._C. Importing it runs the static TORCH_LIBRARY registrations of
// the other translation units; the module itself is empty. It must be imported after torch.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastlora._C",
                               "fastlora operators (torch.ops.fastlora)", -1, nullptr};
  return PyModule_Create(&module);
}
