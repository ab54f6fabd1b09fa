// The chat view (to be written).
export function init(section, model) {}
export function show() {}
export function hide() {}
