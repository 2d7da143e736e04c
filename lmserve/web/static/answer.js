// An assistant message as the stream's frames build it (the shape store.js keeps).

export function newAnswer() {
  return { role: "assistant", blocks: [], stop_reason: null, usage: null, error: null,
    timing: { sent: Date.now() }, resumed: false };
}

function block(message, index, channel) {
  const at = Number.isInteger(index) ? index : Math.max(message.blocks.length - 1, 0);
  while (message.blocks.length <= at) {
    message.blocks.push({ channel: channel ?? "output", text: "", done: false });
  }
  return message.blocks[at];
}

/** Applies one frame's data to `message`; message.stop's data is left to the caller. */
export function applyFrame(message, name, data) {
  if (name === "block.start") block(message, data.index, data.channel);
  else if (name === "block.delta") {
    block(message, data.index, data.channel).text += data.text ?? "";
    message.timing.first ??= Date.now();
  } else if (name === "block.stop") block(message, data.index).done = true;
  else if (name === "message.delta" && data.usage) message.usage = data.usage;
  else if (name === "error") {
    message.error = { type: data.type ?? "internal", message: data.message ?? "Generation failed." };
  }
}
