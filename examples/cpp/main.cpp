// transferkit_predict: run a transferkit TorchScript export from C++ with libtorch.
//
//   transferkit_predict MODEL.pt [--all] INPUT...
//
// Each INPUT is a binary PPM image (P6, 8-bit RGB) whose size is the model's crop size
// (input_spec.image_size in the metadata), or, for audio models, raw little-endian float32
// samples at the model's sample rate (a file ending in .f32); a clip longer than the model's
// window is cropped to its middle, as transferkit's predictor and training do. The program reads the
// metadata the export carries (transferkit.json and labels.txt), runs the model on the raw
// input (normalisation is inside the model), applies softmax / sigmoid / identity as the
// task says and prints one line per input, "INPUT<TAB>top-1 label<TAB>score". With --all
// each is followed by one "<TAB>label<TAB>score" line per label, in label order. A regression
// model has no top label: its line is "INPUT<TAB>values", followed by one "<TAB>output<TAB>value"
// line per output, with or without --all.
#include <torch/script.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// A minimal JSON reader for the metadata (json.dumps(indent=1, sort_keys=True)): enough to find
// a key of one object and take its value as text; string values are not unescaped.
// Where the value of `key` starts in the JSON object `json` (a key of that object itself, not of
// an object nested in it: the metadata's "decisions" hold keys of the same names), or npos.
size_t value_at(const std::string& json, const std::string& key) {
  const std::string needle = "\"" + key + "\"";
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < json.size(); ++i) {
    const char c = json[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '{' || c == '[') {
      ++depth;
    } else if (c == '}' || c == ']') {
      --depth;
    } else if (c == '"') {
      if (depth == 1 && json.compare(i, needle.size(), needle) == 0) {
        const auto colon = json.find_first_not_of(" \t\n\r", i + needle.size());
        if (colon != std::string::npos && json[colon] == ':') return json.find_first_not_of(" \t\n\r", colon + 1);
      }
      in_string = true;
    }
  }
  return std::string::npos;
}

// The value of `key` in the JSON object `json`, as text: a string without its quotes, a number
// or literal as written, a nested object whole (braces included); "" when absent.
std::string json_value(const std::string& json, const std::string& key) {
  const auto i = value_at(json, key);
  if (i == std::string::npos) return "";
  if (json[i] == '"') return json.substr(i + 1, json.find('"', i + 1) - i - 1);
  if (json[i] == '{') {  // up to its matching brace
    int depth = 0;
    bool in_string = false;
    for (size_t j = i; j < json.size(); ++j) {
      const char c = json[j];
      if (in_string) {
        if (c == '\\') ++j;
        else if (c == '"') in_string = false;
      } else if (c == '"') {
        in_string = true;
      } else if (c == '{') {
        ++depth;
      } else if (c == '}' && --depth == 0) {
        return json.substr(i, j - i + 1);
      }
    }
    return "";
  }
  const auto end = json.find_first_of(",\n}", i);
  const auto text = json.substr(i, end - i);
  return text.substr(0, text.find_last_not_of(" \t\r") + 1);
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

std::string next_token(std::istream& in) {
  std::string tok;
  while (in >> tok) {
    if (tok[0] != '#') return tok;
    std::string rest;
    std::getline(in, rest);  // a comment runs to the end of the line
  }
  throw std::runtime_error("truncated PPM header");
}

// The next number of a PPM header (`what`: width, height, maxval), or an error naming the file.
int header_number(std::istream& in, const std::string& path, const std::string& what) {
  const std::string tok = next_token(in);
  size_t used = 0;
  int value = -1;
  try {
    value = std::stoi(tok, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != tok.size() || value <= 0)
    throw std::runtime_error(path + ": not a binary PPM image (its " + what + " is '" + tok +
                             "', not a positive number)");
  return value;
}

// A binary PPM (P6, maxval 255) as a uint8 tensor [1, 3, H, W].
torch::Tensor read_ppm(const std::string& path) {
  if (std::filesystem::is_directory(path)) throw std::runtime_error(path + " is a folder, not a PPM image");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  if (next_token(in) != "P6") throw std::runtime_error(path + " is not a binary PPM (P6) image");
  const int width = header_number(in, path, "width");
  const int height = header_number(in, path, "height");
  if (header_number(in, path, "maxval") != 255) throw std::runtime_error(path + ": only 8-bit PPM is supported");
  in.get();  // the single whitespace byte after maxval
  const auto start = in.tellg();
  in.seekg(0, std::ios::end);
  const auto left = static_cast<uint64_t>(in.tellg() - start);
  in.seekg(start);
  const uint64_t want = static_cast<uint64_t>(width) * static_cast<uint64_t>(height) * 3;
  if (left < want)  // before allocating: a header of 99999 x 99999 asked for 30 GB
    throw std::runtime_error(path + ": truncated pixels (its header says " + std::to_string(width) + "x" +
                             std::to_string(height) + ", " + std::to_string(want) + " bytes; " + std::to_string(left) +
                             " follow)");
  std::vector<uint8_t> pixels(static_cast<size_t>(want));
  in.read(reinterpret_cast<char*>(pixels.data()), static_cast<std::streamsize>(pixels.size()));
  if (in.gcount() != static_cast<std::streamsize>(pixels.size())) throw std::runtime_error(path + ": truncated pixels");
  auto hwc = torch::from_blob(pixels.data(), {height, width, 3}, torch::kUInt8);
  return hwc.permute({2, 0, 1}).unsqueeze(0).contiguous();  // copies out of the vector
}

// Raw little-endian float32 samples as a waveform tensor [1, T].
torch::Tensor read_f32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.empty() || bytes.size() % 4 != 0) throw std::runtime_error(path + ": not a float32 sample file");
  const auto n = static_cast<int64_t>(bytes.size() / 4);
  return torch::from_blob(bytes.data(), {1, n}, torch::kFloat32).clone();
}

// The seconds of a clip an audio model sees, as transferkit's predictor computes them: the input
// spec's clip_seconds (the backbone's window, which training crops every clip to), else the
// training run's max_seconds (decisions.config.max_seconds; 30 where the metadata does not
// record it; null: whole clips). 0: whole clips.
double audio_window(const std::string& meta, const std::string& spec) {
  const std::string clip = json_value(spec, "clip_seconds");
  if (!clip.empty() && clip != "null" && std::stod(clip) > 0.0) return std::stod(clip);
  const std::string given = json_value(json_value(json_value(meta, "decisions"), "config"), "max_seconds");
  if (given == "null") return 0.0;
  return given.empty() ? 30.0 : std::stod(given);
}

// The middle `window` seconds of a waveform [1, T] at `rate` Hz (the whole of a shorter one).
torch::Tensor crop_middle(const torch::Tensor& wave, double window, int64_t rate, const std::string& path) {
  if (window <= 0.0) return wave;
  const auto keep = std::max<int64_t>(1, static_cast<int64_t>(std::nearbyint(window * static_cast<double>(rate))));
  const int64_t length = wave.size(1);
  if (length <= keep) return wave;
  std::cerr << path << ": " << static_cast<double>(length) / static_cast<double>(rate)
            << " s, longer than the model's window: its middle " << window << " s is predicted\n";
  return wave.narrow(1, (length - keep) / 2, keep).contiguous();
}

// The message of an error on one line: libtorch appends a C++ stack trace to its own, and an error
// raised inside a TorchScript file (ValueError for pixels it would misread) is a traceback of the
// file's code that ends with the exception's line ("builtins.ValueError: ...", "RuntimeError: ...").
std::string message(const std::exception& e) {
  const std::string what = e.what();
  const std::string first = what.substr(0, what.find('\n'));
  if (first.rfind("The following operation failed in the TorchScript interpreter", 0) != 0) return first;
  std::string raised = first;
  std::istringstream lines(what);
  for (std::string line; std::getline(lines, line);) {
    const std::string name = line.rfind("builtins.", 0) == 0 ? line.substr(9) : line;
    const auto colon = name.find(": ");
    if (colon != std::string::npos && colon >= 5 && name.compare(colon - 5, 5, "Error") == 0 &&
        name.find(' ') > colon)
      raised = name;  // the last such line is the exception's
  }
  return raised;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A TorchScript file is a zip archive ("PK\3\4"); say what else it is before libtorch reports a
// "corrupted" file.
void check_torchscript(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[4] = {};
  in.read(magic, 4);
  if (in.gcount() == 4 && std::string(magic, 4) == std::string("PK\3\4", 4)) return;
  if (ends_with(path, ".onnx") || (in.gcount() > 0 && magic[0] == '\x08'))  // ONNX: a protobuf, ir_version first
    throw std::runtime_error(path + " is an ONNX file; this program runs TorchScript exports (export with a .pt "
                             "path), and ONNX files run with ONNX Runtime");
  throw std::runtime_error(path + " is not a TorchScript export (not a zip archive)");
}

}  // namespace

torch::Tensor read_input(const std::string& path, const std::string& meta) {
  const std::string spec = json_value(meta, "input_spec");
  if (json_value(spec, "kind") == "audio") {
    if (!ends_with(path, ".f32")) throw std::runtime_error("an audio model takes raw float32 .f32 files, got " + path);
    return crop_middle(read_f32(path), audio_window(meta, spec), std::stoll(json_value(spec, "sample_rate")), path);
  }
  torch::Tensor input = read_ppm(path);
  const std::string size = json_value(spec, "image_size");
  if (!size.empty() && size != "null" && (input.size(2) != std::stoi(size) || input.size(3) != std::stoi(size)))
    throw std::runtime_error(path + " is " + std::to_string(input.size(3)) + "x" + std::to_string(input.size(2)) +
                             " but the model takes " + size + "x" + size +
                             "; resize and crop it first as the Python predictor does");
  return input;
}

int main(int argc, char** argv) {
  std::vector<std::string> inputs;
  bool all = false;
  for (int i = 2; i < argc; ++i) {
    if (std::string(argv[i]) == "--all") all = true;
    else inputs.emplace_back(argv[i]);
  }
  if (argc < 3 || inputs.empty()) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt [--all] INPUT.ppm|INPUT.f32...\n";
    return 2;
  }
  const std::string model_path = argv[1];
  try {
    check_torchscript(model_path);
    torch::jit::ExtraFilesMap extra{{"transferkit.json", ""}, {"labels.txt", ""}};
    torch::jit::script::Module module;
    try {
      module = torch::jit::load(model_path, torch::kCPU, extra);
    } catch (const c10::Error& e) {
      // a zip archive without TorchScript's constants: a torch.save file (libtorch calls it "corrupted")
      if (std::string(e.what()).find("constants.pkl") == std::string::npos) throw;
      throw std::runtime_error(model_path + " is a file of torch.save (a checkpoint or weights), not a TorchScript "
                               "export; make one with `transferkit export " + model_path + " --out model.pt`");
    }
    module.eval();
    const std::string& meta = extra["transferkit.json"];
    const auto labels = split_lines(extra["labels.txt"]);
    if (meta.empty() || labels.empty())
      throw std::runtime_error(model_path + " has no transferkit metadata (transferkit.json / labels.txt)");
    const std::string task = json_value(meta, "task");
    std::cerr << "task=" << task << " outputs=" << labels.size()
              << " written by transferkit " << json_value(meta, "transferkit_version") << "\n";
    std::cout.precision(7);
    torch::InferenceMode guard;
    int failed = 0;
    for (const auto& path : inputs) {
      torch::Tensor out;
      try {  // an input that cannot be read or run is reported, and the others are still predicted
        out = module.forward({read_input(path, meta)}).toTensor().to(torch::kFloat32);
      } catch (const std::exception& e) {
        const std::string said = message(e);  // most name the input already
        std::cerr << "error: " << (said.find(path) == std::string::npos ? path + ": " : "") << said << "\n";
        ++failed;
        continue;
      }
      if (out.dim() != 2 || out.size(1) != static_cast<int64_t>(labels.size()))
        throw std::runtime_error("the model output does not match the " + std::to_string(labels.size()) + " labels");
      torch::Tensor scores = task == "multilabel" ? torch::sigmoid(out)
                             : task == "regression" ? out
                                                    : torch::softmax(out, 1);
      scores = scores[0];
      if (task == "regression") {
        std::cout << path << "\tvalues\n";
      } else {
        const int64_t best = scores.argmax().item<int64_t>();
        std::cout << path << "\t" << labels[best] << "\t" << scores[best].item<float>() << "\n";
      }
      if (all || task == "regression")
        for (size_t i = 0; i < labels.size(); ++i)
          std::cout << "\t" << labels[i] << "\t" << scores[static_cast<int64_t>(i)].item<float>() << "\n";
    }
    if (failed) {
      std::cerr << failed << " of " << inputs.size() << " inputs failed (above)\n";
      return 1;
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << message(e) << "\n";
    return 1;
  }
  return 0;
}
