// The upload form: drag and drop, a side and view per PNG / JPEG, client-side limit checks; the overlay toggle.
(function () {
  "use strict";
  var toggle = document.getElementById("heat-toggle");
  if (toggle) {
    toggle.addEventListener("change", function () {
      document.body.classList.toggle("toggle-off", !toggle.checked);
    });
  }
  var form = document.getElementById("upload");
  if (!form) { return; }
  var input = document.getElementById("files");
  var list = document.getElementById("file-list");
  var drop = document.getElementById("drop");
  var busy = document.getElementById("busy");
  var submit = document.getElementById("submit");
  var clientError = document.getElementById("client-error");

  function isPicture(file) {
    return /\.(png|jpe?g)$/i.test(file.name) || /^image\/(png|jpeg)$/.test(file.type);
  }
  function select(name, options, label) {
    var element = document.createElement("select");
    element.name = name;
    element.required = true;
    element.setAttribute("aria-label", label);
    options.forEach(function (pair) {
      var option = document.createElement("option");
      option.value = pair[0];
      option.textContent = pair[1];
      element.appendChild(option);
    });
    return element;
  }
  function hidden(name) {
    var element = document.createElement("input");
    element.type = "hidden";
    element.name = name;
    element.value = "";
    return element;
  }
  function render() {
    list.textContent = "";
    Array.prototype.forEach.call(input.files, function (file) {
      var item = document.createElement("li");
      item.textContent = file.name + " (" + Math.max(1, Math.round(file.size / 1024)) + " KB)";
      if (isPicture(file)) {
        item.appendChild(select("side", [["", "side?"], ["L", "left"], ["R", "right"]], "side of " + file.name));
        item.appendChild(select("view", [["", "view?"], ["CC", "CC"], ["MLO", "MLO"]], "view of " + file.name));
      } else {
        item.appendChild(hidden("side"));
        item.appendChild(hidden("view"));
      }
      list.appendChild(item);
    });
  }
  input.addEventListener("change", render);
  ["dragenter", "dragover"].forEach(function (type) {
    drop.addEventListener(type, function (event) { event.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (type) {
    drop.addEventListener(type, function () { drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (event) {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      render();
    }
  });
  form.addEventListener("submit", function (event) {
    var files = input.files, total = 0;
    Array.prototype.forEach.call(files, function (file) { total += file.size; });
    var problem = null;
    if (!files.length) { problem = "Choose the exam's files first."; }
    else if (files.length > Number(form.dataset.maxFiles)) {
      problem = files.length + " files: at most " + form.dataset.maxFiles + " per exam.";
    } else if (total > Number(form.dataset.maxBytes)) {
      problem = "The files are " + Math.round(total / 1048576) + " MB: at most " +
        Math.round(Number(form.dataset.maxBytes) / 1048576) + " MB per exam.";
    }
    if (problem) {
      event.preventDefault();
      clientError.textContent = problem;
      clientError.hidden = false;
      return;
    }
    clientError.hidden = true;
    busy.hidden = false;
    submit.disabled = true;
  });
  window.addEventListener("pageshow", function () { busy.hidden = true; submit.disabled = false; });
})();
