/** An error the user can fix by changing how the program is called: exit code 2. */
export class UsageError extends Error {
  override name = "UsageError";
}

/** A runtime failure with a message that says what went wrong and what to do: exit code 1. */
export class ClipError extends Error {
  override name = "ClipError";
}
