"""What the terminal shows: progress events as a rich display or plain lines, and text made safe
for a terminal."""
