// The Chorus playground: lists what the server serves, sends the text to the OpenAI-compatible
// speech route, plays the audio while it streams and offers it for download; saves a voice from
// uploaded or recorded audio through the ElevenLabs-compatible route and selects it. No build
// step and no third-party code, so it works on a machine with no internet access.
"use strict";

const MIME = { mp3: "audio/mpeg", opus: "audio/ogg", aac: "audio/aac", flac: "audio/flac", wav: "audio/wav" };
const EXTENSION = { mp3: "mp3", opus: "ogg", aac: "aac", flac: "flac", wav: "wav" };
// Any OpenAI voice name makes Chorus use the model's own default voice when the model maps none.
const DEFAULT_VOICE = "alloy";

const $ = (id) => document.getElementById(id);
const form = $("speak-form"), textBox = $("text"), modelBox = $("model"), voiceBox = $("voice");
const formatBox = $("format"), speedBox = $("speed"), player = $("player");
const speakButton = $("speak"), download = $("download"), statusLine = $("status"), errorBox = $("error");
const keyBox = $("api-key");
// A server with CHORUS_API_KEYS set wants a key on every API call; kept for this browser tab only.
const KEY_STORE = "chorus-api-key";
keyBox.value = sessionStorage.getItem(KEY_STORE) || "";

function authorization() {
  const key = keyBox.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

let voicesByModel = {};
let current = null; // { controller, urls } of the request being played

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
  statusLine.textContent = "";
}

function clearError() {
  errorBox.hidden = true;
  errorBox.textContent = "";
}

// The message out of any of the error shapes Chorus speaks (OpenAI, LocalAI, ElevenLabs).
async function serverMessage(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: fall back on the status */ }
  const error = body && (body.error || body.detail);
  if (error && typeof error.message === "string") return error.message;
  if (typeof error === "string") return error;
  return `the server answered ${response.status} ${response.statusText}`.trim();
}

async function getJSON(path) {
  const response = await fetch(path, { headers: authorization() });
  if (!response.ok) throw new Error(await serverMessage(response));
  return response.json();
}

function option(value, label) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = label;
  return element;
}

function fillVoices() {
  const voices = voicesByModel[modelBox.value] || [];
  voiceBox.replaceChildren(option(DEFAULT_VOICE, "model's default voice"),
    ...voices.map((voice) => option(voice.id, voice.name)));
  if (voices.length) voiceBox.value = voices[0].id;
}

async function loadCatalogue() {
  try {
    const [models, voices] = await Promise.all([getJSON("/v1/models"), getJSON("/v1/audio/voices")]);
    voicesByModel = {};
    for (const voice of voices.voices) (voicesByModel[voice.model] ||= []).push(voice);
    modelBox.replaceChildren(...models.data.map((model) => option(model.id, `${model.id} (${model.owned_by.replace(/^chorus-/, "")})`)));
    if (!models.data.length) showError("This server has no model configured: add a config to its configs directory.");
    fillVoices();
  } catch (error) {
    modelBox.replaceChildren(option("", "unavailable"));
    showError(`Could not load the models from the server: ${error.message}`);
  }
}

function kilobytes(size) {
  return `${(size / 1024).toFixed(0)} kB`;
}

// Feeds encoded chunks to the audio element as they arrive, through Media Source Extensions.
// Appends run on their own, behind the download: a media pipeline that stalls (a busy browser
// has left a buffer update unanswered for a minute) must not hold up the file or the "Done".
// If the media source does not open in time, rejects a chunk, or is still busy a few seconds
// after the last byte arrived, `finish()` answers why, and the caller plays the whole file.
const SOURCE_OPEN_MS = 5000;
const APPEND_GRACE_MS = 3000;

function waitMs(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function streamingSink(mime) {
  const source = new MediaSource();
  const url = URL.createObjectURL(source);
  player.src = url;
  const opened = Promise.race([
    new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true })),
    waitMs(SOURCE_OPEN_MS),
  ]);
  const queue = [];
  let buffer = null;
  let failed = null; // why streaming playback gave up
  let pumping = false;
  let pumped = Promise.resolve();
  const appended = () => new Promise((resolve, reject) => {
    buffer.addEventListener("updateend", resolve, { once: true });
    buffer.addEventListener("error", () => reject(new Error("the browser could not decode a chunk")), { once: true });
  });

  async function pump() {
    pumping = true;
    try {
      if (!buffer) {
        await opened;
        if (source.readyState !== "open") throw new Error("the media source did not open");
        buffer = source.addSourceBuffer(mime);
      }
      while (queue.length && !failed) {
        const done = appended();
        buffer.appendBuffer(queue.shift());
        await done;
      }
    } catch (error) {
      failed = error.message || String(error);
    } finally {
      pumping = false; // set before any other code runs: a push after this starts a new pump
    }
  }

  return {
    url,
    push(chunk) {
      if (failed) return;
      queue.push(chunk);
      if (!pumping) pumped = pump();
    },
    // null once the media source holds the whole stream, or why it does not.
    async finish() {
      await Promise.race([pumped, waitMs(APPEND_GRACE_MS)]);
      if (failed) return failed;
      if (!buffer) return "the media source did not open in time";
      if (pumping || buffer.updating) return "the browser's media pipeline stalled";
      if (source.readyState === "open") source.endOfStream();
      return null;
    },
  };
}

async function speak(event) {
  event.preventDefault();
  clearError();
  if (current) { current.controller.abort(); current.urls.forEach((url) => URL.revokeObjectURL(url)); }
  download.hidden = true;
  const format = formatBox.value;
  const controller = new AbortController();
  current = { controller, urls: [] };
  speakButton.disabled = true;
  statusLine.textContent = "Speaking…";
  try {
    let response;
    try {
      response = await fetch("/v1/audio/speech", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authorization() },
        body: JSON.stringify({
          model: modelBox.value, input: textBox.value, voice: voiceBox.value || DEFAULT_VOICE,
          response_format: format, speed: Number(speedBox.value),
        }),
        signal: controller.signal,
      });
    } catch (error) {
      if (error.name !== "AbortError") showError(`Could not reach the Chorus server: ${error.message}`);
      return;
    }
    if (!response.ok) {
      showError(`The server could not speak this text: ${await serverMessage(response)}`);
      return;
    }
    const mime = MIME[format];
    const streaming = window.MediaSource && MediaSource.isTypeSupported(mime) && response.body;
    const sink = streaming ? streamingSink(mime) : null;
    if (sink) { current.urls.push(sink.url); player.play().catch(() => {}); }
    const parts = [];
    let size = 0;
    try {
      const reader = response.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        parts.push(value);
        size += value.length;
        statusLine.textContent = `Speaking… ${kilobytes(size)} received`;
        if (sink) sink.push(value);
      }
    } catch (error) {
      if (error.name !== "AbortError") showError(`The audio stopped before the end: ${error.message}`);
      return;
    }
    const file = new Blob(parts, { type: mime });
    const fileUrl = URL.createObjectURL(file);
    current.urls.push(fileUrl);
    const unstreamed = sink ? await sink.finish() : "not streamable here";
    // How this take was played, for whoever debugs a page that stayed silent.
    player.dataset.playback = unstreamed ? `whole file: ${unstreamed}` : "streamed";
    if (unstreamed) {
      // Where streaming playback got to, if it got anywhere: the file goes on from there.
      const heard = sink ? player.currentTime : 0;
      player.src = fileUrl;
      player.currentTime = heard;
      player.play().catch(() => {});
    }
    download.href = fileUrl;
    download.download = `chorus-${modelBox.value}.${EXTENSION[format]}`;
    download.hidden = false;
    statusLine.textContent = `Done: ${kilobytes(size)} of ${format}.`;
  } finally {
    speakButton.disabled = false;
  }
}

function showCount() {
  $("count").textContent = textBox.value.length;
}

function showSpeed() {
  $("speed-value").textContent = `${Number(speedBox.value).toFixed(2)}×`;
}

// -- a voice of one's own -------------------------------------------------------------------

const voiceForm = $("voice-form"), voiceName = $("voice-name"), voiceFiles = $("voice-files");
const recordButton = $("record"), saveVoiceButton = $("save-voice"), voiceStatus = $("voice-status");
let recording = null; // { recorder, started, timer, stopped } while the microphone is on
let recorded = null; // the last recording (a Blob), sent with the chosen files

function secondsSince(started) {
  return ((performance.now() - started) / 1000).toFixed(1);
}

async function toggleRecording() {
  clearError();
  if (recording) {
    recording.recorder.stop();
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    showError(`Could not use the microphone: ${error.message}`);
    return;
  }
  const recorder = new MediaRecorder(stream);
  const parts = [];
  recorder.addEventListener("dataavailable", (event) => parts.push(event.data));
  recorder.addEventListener("stop", () => {
    clearInterval(recording.timer);
    stream.getTracks().forEach((track) => track.stop());
    recorded = new Blob(parts, { type: recorder.mimeType });
    voiceStatus.textContent = `Recorded ${secondsSince(recording.started)} s: save the voice to keep it.`;
    recordButton.textContent = "Record";
    recording = null;
  });
  const started = performance.now();
  const timer = setInterval(() => { voiceStatus.textContent = `Recording… ${secondsSince(started)} s`; }, 100);
  // Resolved after the listener above has kept the recording.
  const stopped = new Promise((resolve) => recorder.addEventListener("stop", resolve, { once: true }));
  recording = { recorder, started, timer, stopped };
  recorder.start();
  recordButton.textContent = "Stop";
  voiceStatus.textContent = "Recording… 0.0 s";
}

async function saveVoice(event) {
  event.preventDefault();
  clearError();
  if (recording) {
    const { stopped } = recording;
    recording.recorder.stop();
    await stopped;
  }
  if (!voiceFiles.files.length && !recorded) {
    showError("Choose a recording, or record one, before saving the voice.");
    return;
  }
  const name = voiceName.value.trim();
  const body = new FormData();
  body.append("name", name);
  for (const file of voiceFiles.files) body.append("files", file, file.name);
  if (recorded) body.append("files", recorded, recorded.type.includes("ogg") ? "recording.ogg" : "recording.webm");
  saveVoiceButton.disabled = true;
  voiceStatus.textContent = "Saving…";
  try {
    const response = await fetch("/v1/voices/add", { method: "POST", headers: authorization(), body });
    if (!response.ok) {
      voiceStatus.textContent = "";
      showError(`The server could not save this voice: ${await serverMessage(response)}`);
      return;
    }
    const { voice_id: id } = await response.json();
    recorded = null;
    voiceFiles.value = "";
    await loadCatalogue();
    const model = Object.keys(voicesByModel).find((key) => voicesByModel[key].some((voice) => voice.id === id));
    if (!model) {
      voiceStatus.textContent = `Saved ${name}, but no model here clones voices (XTTS, VALL-E X) to speak it.`;
      return;
    }
    modelBox.value = model;
    fillVoices();
    voiceBox.value = id;
    voiceStatus.textContent = `Saved ${name}: selected with model ${model}.`;
  } catch (error) {
    voiceStatus.textContent = "";
    showError(`Could not reach the Chorus server: ${error.message}`);
  } finally {
    saveVoiceButton.disabled = false;
  }
}

recordButton.addEventListener("click", toggleRecording);
voiceForm.addEventListener("submit", saveVoice);
modelBox.addEventListener("change", fillVoices);
keyBox.addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORE, keyBox.value.trim());
  clearError();
  loadCatalogue();
});
textBox.addEventListener("input", showCount);
speedBox.addEventListener("input", showSpeed);
form.addEventListener("submit", speak);
showCount();
showSpeed();
loadCatalogue();
